//! `muster-coordinator`: parses its configuration and serves until SIGINT or
//! SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "muster-coordinator",
    version,
    about = "Muster's coordinator: HTTP API and runner service"
)]
struct Cli {
    #[command(flatten)]
    config: muster_coordinator::Config,
}

#[tokio::main]
async fn main() {
    muster_common::telemetry::init();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        muster_common::shutdown::requested().await;
        signal.cancel();
    });
    if let Err(error) = muster_coordinator::run(cli.config, shutdown).await {
        eprintln!("muster-coordinator: {error:#}");
        std::process::exit(2);
    }
}
