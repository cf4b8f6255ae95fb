//! The `litevfs` binary: `litevfs serve` runs the page store, `litevfs repack` compacts a stopped
//! one, `litevfs backup` copies one; the other subcommands administer a running store over its
//! HTTP API.

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
    /// Rewrite a stopped store's store.db compactly: 32 KiB store pages (stores created before
    /// them take up to twice their data) and no free pages. Needs free disk for one copy.
    Repack(litevfs::server::RepackArgs),
    /// Copy a local store (store.db and its object files) into a new directory, consistently,
    /// while its server runs or not; the copy is a data directory to serve or keep.
    Backup(litevfs::server::BackupArgs),
    #[command(flatten)]
    Admin(litevfs::admin::AdminCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => litevfs::server::run(*args),
        Command::Repack(args) => litevfs::server::repack(args),
        Command::Backup(args) => litevfs::server::backup(args),
        Command::Admin(cmd) => litevfs::admin::run(cmd),
    }
}
