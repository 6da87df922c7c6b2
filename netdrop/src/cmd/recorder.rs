//! The agent's flight recorder, as the agent runs it: the recorder ([`crate::sink::recorder`])
//! filled by the pipeline; dumps asked for over HTTP (answered to the server), by SIGUSR1 and
//! by the drop-rate trigger (written to `--recorder-dir`, mode 0600, off the event loop).

use std::{
    fs::{DirBuilder, OpenOptions},
    io::BufWriter,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tracing::warn;

use crate::{
    aggregate::Summary,
    cli::RecorderArgs,
    sink::recorder::{Dump, Recorder, RecorderLimits},
};

/// At most one triggered dump in this long.
pub const TRIGGER_EVERY: Duration = Duration::from_mins(1);

/// Why a dump is made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cause {
    Http,
    Signal,
    /// The drops seen in the last second reached `--recorder-trigger`.
    Trigger {
        rate: f64,
        threshold: u64,
    },
}

impl Cause {
    fn word(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Signal => "sigusr1",
            Self::Trigger { .. } => "trigger",
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Http => "asked over HTTP".into(),
            Self::Signal => "SIGUSR1".into(),
            Self::Trigger { rate, threshold } => {
                format!("drop rate {rate:.0}/s reached --recorder-trigger {threshold}/s")
            }
        }
    }
}

/// The recorder and its trigger's state.
pub struct FlightRecorder {
    pub recorder: Recorder,
    limits: RecorderLimits,
    dir: PathBuf,
    trigger: Option<u64>,
    node: String,
    since: SystemTime,
    /// The last trigger check: when, and the records seen then.
    checked: (Instant, u64),
    last_trigger: Option<Instant>,
}

impl FlightRecorder {
    /// `None` when `--recorder-events 0` or `--recorder-bytes 0`.
    pub fn new(args: &RecorderArgs, node: &str) -> Option<Self> {
        let limits = RecorderLimits {
            events: args.recorder_events,
            bytes: args.recorder_bytes,
        };
        let recorder = Recorder::new(limits)?;
        Some(Self {
            recorder,
            limits,
            dir: args.recorder_dir.clone(),
            trigger: args.recorder_trigger,
            node: node.to_string(),
            since: SystemTime::now(),
            checked: (Instant::now(), 0),
            last_trigger: None,
        })
    }

    /// The recorder's content now, with the agent's summary (its counts since the start).
    pub fn dump(&self, cause: Cause, summary: Option<&Summary>) -> Dump {
        let snapshot = self.recorder.snapshot();
        let about = format!(
            "netdrop agent flight recorder on {}: the last {} drops of {} seen since {} (at most {} drops, {} bytes; {} overwritten); dumped at {} ({})",
            self.node,
            snapshot.records.len(),
            snapshot.seen,
            humantime::format_rfc3339_seconds(self.since),
            self.limits.events,
            self.limits.bytes,
            snapshot.overwritten,
            humantime::format_rfc3339_seconds(SystemTime::now()),
            cause.describe(),
        );
        Dump {
            snapshot,
            about,
            lost: summary.map_or(0, |s| s.lost_events),
            rate_limited: summary.map_or(0, |s| s.rate_limited_events),
            summary_json: summary.and_then(|s| serde_json::to_string(s).ok()).unwrap_or_default(),
        }
    }

    /// Called about once a second: the trigger's cause when the drops seen since the last call
    /// reached `--recorder-trigger` and no triggered dump was made in the last minute.
    pub fn check_trigger(&mut self) -> Option<Cause> {
        let threshold = self.trigger?;
        let now = Instant::now();
        let seen = self.recorder.seen();
        let (then, before) = std::mem::replace(&mut self.checked, (now, seen));
        let secs = now.duration_since(then).as_secs_f64().max(0.001);
        let rate = (seen - before) as f64 / secs;
        if rate < threshold as f64 {
            return None;
        }
        if self.last_trigger.is_some_and(|t| now.duration_since(t) < TRIGGER_EVERY) {
            return None;
        }
        self.last_trigger = Some(now);
        Some(Cause::Trigger { rate, threshold })
    }

    /// Writes `dump` to a new file in `--recorder-dir` on a blocking thread; says where (or
    /// why not) on stderr when done.
    pub fn write_file(&self, cause: Cause, dump: Dump) {
        let dir = self.dir.clone();
        let stamp = humantime::format_rfc3339_nanos(SystemTime::now())
            .to_string()
            .replace(':', "");
        let name = format!("recorder-{}-{stamp}-{}.pcapng", self.node, cause.word());
        tokio::task::spawn_blocking(move || {
            let path = dir.join(name);
            match write_new(&dir, &path, &dump) {
                Ok(stats) => eprintln!(
                    "netdrop: flight recorder ({}): {}: {}",
                    cause.describe(),
                    path.display(),
                    stats.describe()
                ),
                Err(e) => warn!(
                    "flight recorder ({}): cannot write {}: {e}",
                    cause.describe(),
                    path.display()
                ),
            }
        });
    }
}

/// Creates `dir` (0700) if needed and `path` in it (0600, never an existing file or a link).
fn write_new(
    dir: &std::path::Path,
    path: &std::path::Path,
    dump: &Dump,
) -> std::io::Result<crate::sink::pcapng::CaptureStats> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let stats = dump.write(BufWriter::with_capacity(256 * 1024, file))?;
    Ok(stats)
}
