//! `muster-agent`: parses its configuration and runs until SIGINT or
//! SIGTERM; exits 2 with a one-line message on bad configuration or when
//! the coordinator refuses the agent token.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "muster-agent",
    version,
    about = "Muster's monitoring agent: checks endpoints from its site and reports to the coordinator"
)]
struct Cli {
    #[command(flatten)]
    config: muster_agent::Config,
}

fn main() {
    muster_common::telemetry::init();
    let cli = Cli::parse();
    let runtime = match muster_agent::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("muster-agent: cannot start the async runtime: {error}");
            std::process::exit(2);
        }
    };
    let outcome = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            muster_common::shutdown::requested().await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
        muster_agent::run(cli.config, shutdown).await
    });
    if let Err(error) = outcome {
        eprintln!("muster-agent: {error:#}");
        std::process::exit(2);
    }
}
