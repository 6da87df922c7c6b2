//! `netdrop reasons`: the drop reasons of the running kernel, named from its own BTF.

use crate::{
    cli::{Format, ReasonsArgs},
    kernel::{KernelInfo, benign},
};

/// `netdrop reasons`.
pub fn run(args: &ReasonsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let kernel = KernelInfo::discover()?;
    let t = &kernel.reasons;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.output {
        Format::Json => {
            let list: Vec<_> = t
                .iter()
                .map(|(code, name)| {
                    serde_json::json!({"code": code, "name": name, "hidden_by_default": benign::is_benign(name)})
                })
                .collect();
            let doc = serde_json::json!({"kernel": kernel.release, "source": t.source(), "reasons": list});
            writeln!(out, "{doc}")?;
        }
        Format::Text => {
            writeln!(
                out,
                "drop reasons of kernel {} (from {:?}); * = benign, hidden by default",
                kernel.release,
                t.source()
            )?;
            for (code, name) in t.iter() {
                let mark = if benign::is_benign(name) { "*" } else { " " };
                writeln!(out, "{code:>8} {mark} {name}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
