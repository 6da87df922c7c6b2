//! `netdrop cleanup`: removes the tc filters netdrop left behind (an agent killed, or
//! uninstalled while its filters stayed) from every interface of the given node namespaces.
//! Filters of a netdrop that still runs, and everyone else's, stay.

use crate::{cli::CleanupArgs, source::interfaces};

pub fn run(args: &CleanupArgs) -> anyhow::Result<()> {
    for (node, removed) in interfaces::remove_leftovers_in(&args.node_netns)? {
        println!("netdrop cleanup: {node}: removed {removed} tc filter(s) left by netdrop runs that are gone");
    }
    Ok(())
}
