//! Configuration of `litevfs serve`: the command-line flags (each also settable from the
//! environment), and parsing of durations, sizes and access tokens.
//!
//! Owns turning user input into validated values ([`Config`]); it performs no network I/O and
//! decides nothing about requests (that is [`super::auth`]'s job).

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::wire::validate_cluster_name;

/// Flags of `litevfs serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory holding the store (`store.db`) and spooled uploads (`tmp/`).
    #[arg(long, env = "LITEVFS_DATA_DIR", default_value = "./litevfs-data")]
    pub data_dir: PathBuf,
    /// Address to listen on (host:port; port 0 picks a free port).
    #[arg(long, env = "LITEVFS_LISTEN", default_value = "127.0.0.1:20202")]
    pub listen: String,
    /// How long every position stays readable after it was superseded (e.g. 10m, 30s, 1h, 500ms).
    #[arg(long, env = "LITEVFS_RETENTION", default_value = "10m", value_parser = parse_duration)]
    pub retention: Duration,
    /// Largest request body accepted (e.g. 1GiB, 64MiB, 4096); larger bodies get 413 ETOOLARGE.
    #[arg(long, env = "LITEVFS_MAX_BODY_SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub max_body_size: u64,
    /// An access token: TOKEN=CLUSTER:rw or TOKEN=CLUSTER:ro (CLUSTER `*` = every cluster).
    /// Repeatable; the environment variable takes a comma-separated list.
    #[arg(long = "token", env = "LITEVFS_TOKENS", value_delimiter = ',')]
    pub tokens: Vec<String>,
    /// A file of tokens, one TOKEN=CLUSTER:MODE per line; blank lines and `#` comments ignored.
    #[arg(long, env = "LITEVFS_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Allow anonymous access on a non-loopback address when no token is configured.
    #[arg(long, env = "LITEVFS_INSECURE")]
    pub insecure: bool,
    /// Longest a client may stall mid-transfer: a request body that receives no bytes, or a
    /// snapshot that the client does not read, for this long is aborted (e.g. 60s, 500ms).
    #[arg(long, env = "LITEVFS_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// Longest a connection may take to send a request head, and longest an idle keep-alive
    /// connection is kept. Keep it above clients' connection-pool idle time (litevfs: 60s).
    #[arg(long, env = "LITEVFS_HEADER_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Keep the databases in object storage instead of `DATA_DIR/store.db`:
    /// `s3://BUCKET/PREFIX` (S3 or any S3-compatible service) or `file://DIR` (the same layout in
    /// a local directory). `--data-dir` then holds only a bounded cache (`--cache-size`).
    #[arg(long = "store", env = "LITEVFS_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// S3 access key id (with --store s3://).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<String>,
    /// S3 secret access key (with --store s3://).
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub aws_secret_access_key: Option<String>,
    /// S3 session token, for temporary credentials (with --store s3://).
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true)]
    pub aws_session_token: Option<String>,
    /// S3 region (with --store s3://; the service's default is us-east-1).
    #[arg(long, env = "AWS_REGION")]
    pub aws_region: Option<String>,
    /// Endpoint of an S3-compatible service (MinIO, R2, Tigris, ...); http:// is allowed.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,
    /// Path-style addressing (ENDPOINT/BUCKET/KEY), which MinIO and most self-hosted
    /// S3-compatible servers need, instead of virtual-hosted style (BUCKET.ENDPOINT/KEY).
    #[arg(long, env = "LITEVFS_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// With --store: how often databases that have long-polling readers or a lease granted here
    /// are checked for commits made through other servers (e.g. 100ms, 1s).
    #[arg(long, env = "LITEVFS_POLL_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// With --store: the most disk the cache in --data-dir may use (e.g. 1GiB, 256MiB); least
    /// recently used pages are evicted first.
    #[arg(long, env = "LITEVFS_CACHE_SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub cache_size: u64,
    /// With --store: how far apart the clocks of the servers on one bucket may be. A lease that
    /// expired is taken over only this long after its expiry.
    #[arg(long, env = "LITEVFS_MAX_CLOCK_SKEW", default_value = "500ms", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
    /// With --store: how long an object that compaction superseded stays in the bucket beyond
    /// --retention before it is deleted; keep it above the longest request (default 60s).
    #[arg(long, env = "LITEVFS_GC_GRACE", default_value = "60s", value_parser = parse_duration)]
    pub gc_grace: Duration,
    /// How often compaction runs (default: half the retention, between 200ms and 30s, and
    /// with --store at most 5s).
    #[arg(long, env = "LITEVFS_COMPACTION_INTERVAL", value_parser = parse_duration)]
    pub compaction_interval: Option<Duration>,
    /// FOR BENCHMARKS ONLY: sleep this many milliseconds before handling every request, to
    /// simulate a remote page store.
    #[arg(long, env = "LITEVFS_DELAY_MS", default_value_t = 0)]
    pub delay_ms: u64,
}

/// Whether a token may change data.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Which clusters a token opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterScope {
    /// Exactly this cluster.
    One(String),
    /// Every cluster (`*`); the request picks one with `?cluster=`.
    Any,
}

/// What a configured token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub scope: ClusterScope,
    pub access: Access,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid token spec {0:?}: expected TOKEN=CLUSTER:rw or TOKEN=CLUSTER:ro")]
    TokenSpec(String),
    #[error("invalid cluster {0:?} in a token spec: {1}")]
    TokenCluster(String, crate::wire::NameError),
    #[error(
        "token {0} is configured twice ({1} and {2}); each token must have one grant: remove one"
    )]
    DuplicateToken(String, String, String),
    #[error("cannot read tokens file {0}: {1}")]
    TokensFile(PathBuf, std::io::Error),
    #[error("cannot resolve listen address {0:?}: {1}")]
    Listen(String, String),
    #[error(
        "refusing to listen on non-loopback address {0} without tokens; \
         configure --token/--tokens-file or pass --insecure"
    )]
    Insecure(SocketAddr),
    #[error("{0}")]
    Bucket(String),
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub retention: Duration,
    pub max_body_size: u64,
    pub tokens: HashMap<String, Grant>,
    /// How long a transfer may make no progress before it is aborted.
    pub stall_timeout: Duration,
    /// How long a connection may take to send a request head (and stay idle between requests).
    pub header_timeout: Duration,
    pub delay: Duration,
    /// How often compaction runs.
    pub compaction_interval: Duration,
    /// Bucket mode (`--store`).
    pub bucket: Option<BucketSettings>,
}

/// Settings of bucket mode.
#[derive(Clone, Debug)]
pub struct BucketSettings {
    pub conn: crate::server::bucket::BucketConfig,
    pub remote: crate::server::store::remote::RemoteConfig,
}

/// Smallest `--gc-grace`: more than a commit can take from its last look at the manifest to the
/// end of its conditional create (no attempt starts after the 10 s settle deadline, and one takes
/// at most 10 s), so an object retired after that look is never deleted before the create ends.
pub const MIN_GC_GRACE: Duration = Duration::from_secs(30);

/// Smallest `--cache-size`: the index of a database must fit beside some pages.
const MIN_CACHE_SIZE: u64 = 8 << 20;

fn bucket_settings(args: &ServeArgs) -> Result<Option<BucketSettings>, ConfigError> {
    let Some(url) = &args.store else {
        return Ok(None);
    };
    if args.cache_size < MIN_CACHE_SIZE {
        return Err(ConfigError::Bucket(format!(
            "--cache-size {} is below the minimum of {MIN_CACHE_SIZE} bytes",
            args.cache_size
        )));
    }
    if args.gc_grace < MIN_GC_GRACE {
        return Err(ConfigError::Bucket(format!(
            "--gc-grace must be at least {}s: a commit in flight must never find the objects it \
             checked against already deleted",
            MIN_GC_GRACE.as_secs()
        )));
    }
    if args.poll_interval < Duration::from_millis(10) {
        return Err(ConfigError::Bucket(
            "--poll-interval must be at least 10ms".into(),
        ));
    }
    Ok(Some(BucketSettings {
        conn: crate::server::bucket::BucketConfig {
            url: url.clone(),
            access_key_id: args.aws_access_key_id.clone(),
            secret_access_key: args.aws_secret_access_key.clone(),
            session_token: args.aws_session_token.clone(),
            region: args.aws_region.clone(),
            endpoint: args.aws_endpoint_url.clone(),
            path_style: args.s3_path_style,
        },
        remote: crate::server::store::remote::RemoteConfig {
            poll_interval: args.poll_interval,
            retention: args.retention,
            max_skew: args.max_clock_skew,
            cache_size: args.cache_size,
            gc_grace: args.gc_grace,
            sweep_delay: (default_compaction_interval(args.retention, true)
                .min(args.compaction_interval.unwrap_or(Duration::MAX))
                * 10)
                .min(Duration::from_secs(60)),
        },
    }))
}

impl Config {
    pub fn from_args(args: &ServeArgs) -> Result<Config, ConfigError> {
        let mut tokens = HashMap::new();
        // Where each token was given, to name both places of a duplicate.
        let mut from: HashMap<String, String> = HashMap::new();
        let mut add = |spec: &str, place: String| -> Result<(), ConfigError> {
            let (t, g) = parse_token(spec)?;
            if let Some(first) = from.get(&t) {
                return Err(ConfigError::DuplicateToken(
                    redact(&t),
                    first.clone(),
                    place,
                ));
            }
            from.insert(t.clone(), place);
            tokens.insert(t, g);
            Ok(())
        };
        for (i, spec) in args.tokens.iter().enumerate() {
            add(spec, format!("--token/LITEVFS_TOKENS entry {}", i + 1))?;
        }
        if let Some(path) = &args.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::TokensFile(path.clone(), e))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                add(line, format!("line {} of {}", n + 1, path.display()))?;
            }
        }
        let listen = resolve(&args.listen)?;
        if tokens.is_empty() && !listen.ip().is_loopback() && !args.insecure {
            return Err(ConfigError::Insecure(listen));
        }
        Ok(Config {
            data_dir: args.data_dir.clone(),
            listen,
            retention: args.retention,
            max_body_size: args.max_body_size,
            tokens,
            stall_timeout: args.stall_timeout.max(Duration::from_millis(1)),
            header_timeout: args.header_timeout.max(Duration::from_millis(1)),
            delay: Duration::from_millis(args.delay_ms),
            compaction_interval: args.compaction_interval.map_or_else(
                || default_compaction_interval(args.retention, args.store.is_some()),
                |d| d.max(Duration::from_millis(10)),
            ),
            bucket: bucket_settings(args)?,
        })
    }
}

/// How often compaction runs by default: half the retention, between 200 ms and 30 s; with
/// `--store` at least every 5 s, so commit objects are merged before many pile up.
fn default_compaction_interval(retention: Duration, bucket: bool) -> Duration {
    let every = (retention / 2).clamp(Duration::from_millis(200), Duration::from_secs(30));
    if bucket {
        every.min(Duration::from_secs(5))
    } else {
        every
    }
}

fn resolve(listen: &str) -> Result<SocketAddr, ConfigError> {
    let err = |e: String| ConfigError::Listen(listen.to_string(), e);
    listen
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))
}

/// A token as error messages show it: its first four characters.
fn redact(token: &str) -> String {
    let head: String = token.chars().take(4).collect();
    format!("{head:?}…")
}

/// Parses `TOKEN=CLUSTER:rw|ro`. The token may itself contain `=`; the last one separates.
pub fn parse_token(spec: &str) -> Result<(String, Grant), ConfigError> {
    let bad = || ConfigError::TokenSpec(spec.to_string());
    let (token, rest) = spec.rsplit_once('=').ok_or_else(bad)?;
    let (cluster, mode) = rest.rsplit_once(':').ok_or_else(bad)?;
    let access = match mode {
        "rw" => Access::ReadWrite,
        "ro" => Access::ReadOnly,
        _ => return Err(bad()),
    };
    if token.is_empty() {
        return Err(bad());
    }
    let scope = if cluster == "*" {
        ClusterScope::Any
    } else {
        validate_cluster_name(cluster)
            .map_err(|e| ConfigError::TokenCluster(cluster.to_string(), e))?;
        ClusterScope::One(cluster.to_string())
    };
    Ok((token.to_string(), Grant { scope, access }))
}

/// Parses `500ms`, `30s`, `10m`, `2h`, `1d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m, h or d)"
            ));
        }
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} too large"))
}

/// Parses a byte size: a number with an optional unit (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// binary multiples, case-insensitive, optional trailing `B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.trim_end_matches('b').trim_end_matches('i') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("invalid size unit in {s:?} (use K, M, G, T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("3w").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("1X").is_err());
    }

    #[test]
    fn tokens() {
        let (t, g) = parse_token("FlyV1 a=b==prod:ro").unwrap();
        assert_eq!(t, "FlyV1 a=b=");
        assert_eq!(
            g,
            Grant {
                scope: ClusterScope::One("prod".into()),
                access: Access::ReadOnly
            }
        );
        let (t, g) = parse_token("secret=prod:rw").unwrap();
        assert_eq!(t, "secret");
        assert_eq!(
            g,
            Grant {
                scope: ClusterScope::One("prod".into()),
                access: Access::ReadWrite
            }
        );
        assert_eq!(
            parse_token("admin=*:rw").unwrap().1.scope,
            ClusterScope::Any
        );
        for bad in [
            "secret",
            "secret=prod",
            "secret=prod:rx",
            "=prod:rw",
            "s=../x:rw",
        ] {
            assert!(parse_token(bad).is_err(), "{bad}");
        }
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let argv = std::iter::once("serve").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn a_token_given_twice_is_refused_naming_both_places() {
        let e = Config::from_args(&serve_args(&["--token", "s3cret=a:rw,s3cret=b:ro"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("entry 1") && e.contains("entry 2"), "{e}");
        assert!(
            !e.contains("s3cret"),
            "the token itself is not printed: {e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# comment\nother=a:rw\n\ns3cret=*:rw\n").unwrap();
        let args = [
            "--token",
            "s3cret=a:rw",
            "--tokens-file",
            file.to_str().unwrap(),
        ];
        let e = Config::from_args(&serve_args(&args))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4 of"), "{e}");
        let args = [
            "--token",
            "one=a:rw",
            "--tokens-file",
            file.to_str().unwrap(),
        ];
        assert_eq!(
            Config::from_args(&serve_args(&args)).unwrap().tokens.len(),
            3
        );
    }
}
