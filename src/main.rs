//! The `litevfs` binary: `litevfs serve` runs the page store; the other subcommands administer
//! a running store over its HTTP API.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "litevfs", version, about = "litevfs page store and admin tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the page store (the LiteFS Cloud HTTP API) on a local data directory, or on object
    /// storage with --store.
    Serve(Box<litevfs::server::ServeArgs>),
    #[command(flatten)]
    Admin(litevfs::admin::AdminCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => litevfs::server::run(*args),
        Command::Admin(cmd) => litevfs::admin::run(cmd),
    }
}
