use std::{io::IsTerminal as _, process::ExitCode};

use clap::Parser as _;
use netdrop::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(netdrop::sink::log_colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref()))
        // kube-rs warns on every retry of a 403; the resolver reports each state change once.
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!("netdrop={},kube_runtime=error", cli.log)))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netdrop: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Trace(args) => netdrop::cmd::trace::run(args).await,
            Command::Reasons(args) => netdrop::cmd::reasons::run(&args),
            Command::Resolve(args) => netdrop::cmd::resolve::run(args).await,
            Command::Interfaces(args) => netdrop::cmd::interfaces::run(args).await,
            Command::Capture(args) => netdrop::cmd::capture::run(args).await,
            Command::Report(args) => netdrop::cmd::report::run(&args),
            Command::Agent(args) => netdrop::cmd::agent::run(*args).await,
            Command::Cleanup(args) => netdrop::cmd::cleanup::run(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netdrop: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `netdrop trace | head` ends with EPIPE: not an error worth a message.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
