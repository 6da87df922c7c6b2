//! Which drops are shown and which are hidden (benign frees, reasons not selected): one
//! decision for events and counter rows.

use netdrop_common::{ABSENT, Config};

use crate::{enrich::classify, kernel::benign};

/// Decides whether a drop is shown or hidden: the kernel's emit decision (reasons, non-IP
/// `NOT_SPECIFIED`), plus benign teardown locations, which only userspace can name.
pub struct Visibility {
    config: Config,
    /// Hide drops at socket-teardown functions ([`crate::kernel::benign::BENIGN_LOCATIONS`]).
    pub hide_benign_locations: bool,
}

impl Visibility {
    pub fn new(config: &Config, hide_benign_locations: bool) -> Self {
        Self {
            config: *config,
            hide_benign_locations,
        }
    }

    /// `function`: the function the drop location lies in (looked up once, by the caller).
    pub fn is_hidden(&self, reason: u32, ip_version: u8, function: Option<&str>, kernel_class: u8) -> bool {
        let quiet = self.config.quiet_reason_without_ip;
        !self.config.emits(reason)
            || (ip_version == 0 && reason == quiet && quiet != ABSENT)
            || (self.hide_benign_locations
                && function
                    .is_some_and(|f| benign::is_benign_location(f) || classify::is_tcp_teardown(Some(f), kernel_class)))
    }
}
