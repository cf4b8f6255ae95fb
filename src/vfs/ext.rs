//! The extension's entry points, configuration from the environment, and logging setup.
//!
//! Owns `sqlite3_litevfs_init` (registers the VFS `litevfs`; the default VFS too when
//! `LITEVFS_DEFAULT_VFS` is on) and `sqlite3_litevfs_default_init` (registers it as the default
//! VFS). Both register through the `sqlite3_api_routines` the host hands over, so they work in
//! hosts that link SQLite statically, and return `SQLITE_OK_LOAD_PERMANENTLY`. Loading again
//! into the same SQLite is a no-op (or only makes the VFS the default). A bad environment value
//! that would change where databases open fails the load, before anything is registered. It
//! does no I/O beyond reading the environment.

use std::ffi::{CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Once, OnceLock};

use sqlite_plugin::logger::SqliteLogger;
use sqlite_plugin::sqlite3_api_routines;
use sqlite_plugin::vars;
use sqlite_plugin::vfs::{RegisterOpts, register_dynamic};

use super::Litevfs;
use super::config::Config;
use super::file::LitevfsVfs;

/// The VFS name, as used in `file:NAME?vfs=litevfs`.
pub const VFS_NAME: &str = "litevfs";

static GLOBAL: OnceLock<Result<Arc<Litevfs>, String>> = OnceLock::new();
pub(super) static LOGGER: OnceLock<SqliteLogger> = OnceLock::new();
static TRACING: Once = Once::new();

/// Entry point of `.load liblitevfs.so`: registers the VFS `litevfs`, and makes it the default
/// VFS when `LITEVFS_DEFAULT_VFS` is on.
///
/// # Safety
/// Called by SQLite's extension loader with a valid `sqlite3_api_routines` pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sqlite3_litevfs_init(
    _db: *mut c_void,
    pz_err: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
) -> c_int {
    // SAFETY: forwarded unchanged from SQLite's loader.
    unsafe { init(pz_err, p_api, false) }
}

/// Entry point of `.load liblitevfs.so sqlite3_litevfs_default_init`: registers `litevfs` and
/// makes it the default VFS, so plain `NAME` filenames open databases in the page store.
///
/// # Safety
/// Called by SQLite's extension loader with a valid `sqlite3_api_routines` pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sqlite3_litevfs_default_init(
    _db: *mut c_void,
    pz_err: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
) -> c_int {
    // SAFETY: forwarded unchanged from SQLite's loader.
    unsafe { init(pz_err, p_api, true) }
}

/// # Safety
/// `p_api` must be null or point to the host's `sqlite3_api_routines`; `pz_err` null or writable.
unsafe fn init(
    pz_err: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
    make_default: bool,
) -> c_int {
    // SAFETY: the pointer comes from SQLite's loader, which keeps the table alive.
    let Some(api) = (unsafe { p_api.as_ref() }) else {
        return vars::SQLITE_ERROR;
    };
    // SAFETY: `p_api` and `api` are the same live routine table (checked non-null above).
    let result = catch_unwind(AssertUnwindSafe(|| unsafe {
        register(p_api, api, make_default)
    }));
    let err = match result {
        Ok(Ok(())) => return vars::SQLITE_OK_LOAD_PERMANENTLY,
        Ok(Err(msg)) => msg,
        Err(_) => "litevfs: panic while loading the extension".to_string(),
    };
    tracing::error!("{err}");
    if let (Some(mprintf), false) = (api.mprintf, pz_err.is_null()) {
        let msg = CString::new(err.replace('%', "%%").replace('\0', "")).unwrap_or_default();
        // SAFETY: `msg` is a NUL-terminated format string without conversions; SQLite frees it.
        unsafe { *pz_err = mprintf(msg.as_ptr()) };
    }
    vars::SQLITE_ERROR
}

/// # Safety
/// `p_api` and `api` point to the same live `sqlite3_api_routines`.
unsafe fn register(
    p_api: *mut sqlite3_api_routines,
    api: &sqlite3_api_routines,
    make_default: bool,
) -> Result<(), String> {
    let config = Config::from_env().map_err(|e| format!("litevfs: {e}"))?;
    setup_tracing(&config);
    let make_default = make_default || config.default_vfs;
    let name = CString::new(VFS_NAME).expect("no NUL");
    if let (Some(find), Some(reg)) = (api.vfs_find, api.vfs_register) {
        // SAFETY: `name` is a valid C string; the functions come from the host's SQLite.
        let existing = unsafe { find(name.as_ptr()) };
        if !existing.is_null() {
            // SAFETY: `existing` is a VFS registered in this SQLite; re-registering moves it.
            let rc = if make_default {
                unsafe { reg(existing, 1) }
            } else {
                vars::SQLITE_OK
            };
            return if rc == vars::SQLITE_OK {
                Ok(())
            } else {
                Err(format!("litevfs: making it the default VFS failed ({rc})"))
            };
        }
    }
    let global = GLOBAL.get_or_init(|| {
        Litevfs::new(config)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    let global = global.clone().map_err(|e| format!("litevfs: {e}"))?;
    // SAFETY: `p_api` is the host's routine table (see above).
    let logger = unsafe {
        register_dynamic(
            p_api,
            name,
            LitevfsVfs { global },
            RegisterOpts { make_default },
        )
    }
    .map_err(|rc| format!("litevfs: registering the VFS failed ({rc})"))?;
    let _ = LOGGER.set(logger);
    Ok(())
}

/// Logs to stderr, or to `LITEVFS_LOG_FILE`; `RUST_LOG` filters (default: warnings). Leaves an
/// existing global subscriber of the host in place.
fn setup_tracing(config: &Config) {
    TRACING.call_once(|| {
        use tracing_subscriber::EnvFilter;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let builder = tracing_subscriber::fmt().with_env_filter(filter);
        let file = config.log_file.as_ref().and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        let _ = match file {
            Some(f) => builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .try_init(),
            None => {
                let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
                builder
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .try_init()
            }
        };
    });
}
