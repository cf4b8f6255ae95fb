//! Machine set-up: finds or installs what the build and the tests need, and builds the release
//! artifacts.
//!
//! On Debian as root, missing system packages are installed with apt-get; otherwise the exact
//! command is printed and the task stops. Python packages go into the project-local `.venv`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::proc::{Error, run_checked, which};

/// The repository root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the repo")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Paths of the built artifacts.
pub struct Artifacts {
    pub bin: PathBuf,
    pub ext: PathBuf,
}

impl Artifacts {
    pub fn release() -> Artifacts {
        let dir = target_dir().join("release");
        Artifacts {
            bin: dir.join("litevfs"),
            ext: dir.join("liblitevfs.so"),
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn libclang_present() -> bool {
    if std::env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    let found_in = |dir: &Path| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.starts_with("libclang") && n.contains(".so") && !n.starts_with("libclang-cpp")
            })
    };
    let mut dirs = vec![
        PathBuf::from("/usr/lib/x86_64-linux-gnu"),
        PathBuf::from("/usr/lib"),
    ];
    for e in std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("llvm-") {
            dirs.push(e.path().join("lib"));
        }
    }
    dirs.iter().any(|d| found_in(d))
}

fn python_venv_works() -> bool {
    let dir = std::env::temp_dir().join(format!("litevfs-venv-probe-{}", std::process::id()));
    let ok = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&dir)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// A system dependency: how to tell it is there, and the Debian package that provides it.
struct Need {
    what: &'static str,
    package: &'static str,
    present: fn() -> bool,
}

/// Makes sure the system packages are there; `python` adds what the end-to-end tests need.
pub fn ensure_system(python: bool) -> Result<(), Error> {
    let mut needs = vec![
        Need {
            what: "libclang (bindgen, for the SQLite VFS binding)",
            package: "libclang-dev",
            present: libclang_present,
        },
        Need {
            what: "the sqlite3 shell",
            package: "sqlite3",
            present: || which("sqlite3").is_some(),
        },
    ];
    if python {
        needs.push(Need {
            what: "python3",
            package: "python3",
            present: || which("python3").is_some(),
        });
        needs.push(Need {
            what: "python3 venv",
            package: "python3-venv",
            present: python_venv_works,
        });
    }
    let missing: Vec<&Need> = needs.iter().filter(|n| !(n.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let pkgs: Vec<&str> = missing.iter().map(|n| n.package).collect();
    let what: Vec<&str> = missing.iter().map(|n| n.what).collect();
    let cmd = format!("apt-get update && apt-get install -y {}", pkgs.join(" "));
    if !is_root() || which("apt-get").is_none() {
        return Err(Error(format!(
            "missing {}; install it with:\n    sudo {cmd}\nthen run this command again",
            what.join(", ")
        )));
    }
    println!("==> installing {} ({})", pkgs.join(" "), what.join(", "));
    run_checked(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )?;
    for n in missing {
        if !(n.present)() {
            return Err(Error(format!(
                "{} still missing after installing {}",
                n.what, n.package
            )));
        }
    }
    Ok(())
}

/// Builds the release binary, the extension and the examples.
pub fn build_release() -> Result<Artifacts, Error> {
    println!("==> building release artifacts (litevfs, liblitevfs.so, examples)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_checked(
        Command::new(&cargo).current_dir(root()).args([
            "build",
            "--release",
            "--package",
            "litevfs",
            "--bins",
            "--lib",
            "--examples",
        ]),
        "cargo build --release",
    )?;
    let a = Artifacts::release();
    for p in [&a.bin, &a.ext] {
        if !p.exists() {
            return Err(Error(format!("build did not produce {}", p.display())));
        }
    }
    Ok(a)
}

/// Creates `.venv` with the Python packages the tests use (apsw and pytest for the end-to-end
/// tests, moto's S3 server for the object-storage tests); returns its python.
pub fn ensure_venv() -> Result<PathBuf, Error> {
    let venv = root().join(".venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        println!("==> creating {}", venv.display());
        run_checked(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        )?;
    }
    // moto's server is the S3 API the object-storage tests run against (on loopback).
    let have = Command::new(&py)
        .args(["-c", "import apsw, pytest, moto.server, flask"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        println!("==> installing apsw, pytest and moto[server] into .venv");
        run_checked(
            Command::new(&py).args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "apsw",
                "pytest",
                "moto[server]",
            ]),
            "pip install apsw pytest moto[server]",
        )?;
    }
    Ok(py)
}
