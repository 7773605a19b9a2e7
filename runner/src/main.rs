//! `muster-runner`: parses its configuration and runs until SIGINT or
//! SIGTERM, then drains: running jobs get `--drain-timeout` to finish.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "muster-runner",
    version,
    about = "Muster's runner: executes leased runs in containers or as local processes"
)]
struct Cli {
    #[command(flatten)]
    config: muster_runner::Config,
}

#[tokio::main]
async fn main() {
    muster_common::telemetry::init();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        muster_common::shutdown::requested().await;
        tracing::info!("shutdown requested; draining");
        stop.cancel();
    });
    if let Err(error) = muster_runner::run(cli.config, shutdown).await {
        eprintln!("muster-runner: {error:#}");
        std::process::exit(2);
    }
}
