//! litevfs: SQLite databases that live in a remote page store and open lazily anywhere.
//!
//! One crate, two artifacts. The `cdylib` is `liblitevfs.so`, a loadable SQLite extension that
//! registers the VFS `litevfs` ([`vfs`]). The `litevfs` binary runs the page store
//! (`litevfs serve`, [`server`]) and administers it ([`admin`]). Both sides share the wire types
//! ([`wire`]) and the LTX codec ([`ltx`]). See `README.md` for use and `../shared/design.md` for
//! the architecture.

pub mod btree;
pub mod dbfile;
pub mod ltx;
pub mod vfs;
pub mod wire;

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod server;
