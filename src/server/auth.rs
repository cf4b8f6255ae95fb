//! Who is calling: the token in `Authorization` (sent verbatim, spec 1.2), the cluster it opens,
//! and whether it may write. Also the query-string helper every handler uses.
//!
//! Rules: with tokens configured, a request without a known token gets 401 `EINVALIDAUTH`; a
//! token bound to one cluster gets 403 `EFORBIDDEN` if `?cluster=` names another; a read-only
//! token gets 403 on anything that writes. With no tokens configured (only allowed on loopback
//! or with `--insecure`), every caller is anonymous read-write and picks the cluster with
//! `?cluster=` (default `default`). This module does not touch the store.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;

use super::App;
use super::config::{Access, ClusterScope};
use super::error::{ApiError, ApiResult};
use crate::wire::{ErrorCode, validate_cluster_name};

/// Cluster used when a request names none.
pub const DEFAULT_CLUSTER: &str = "default";

/// Decoded query parameters, in order. Only [`REPEATABLE`] parameters may appear more than once.
#[derive(Clone, Debug, Default)]
pub struct Params(pub Vec<(String, String)>);

/// Parameters that may be repeated (`pgno=1&pgno=2`); any other repeat is refused, since which
/// of two values a server uses (`db=a&db=../x`) must never be a guess.
pub const REPEATABLE: &[&str] = &["pgno"];

impl Params {
    pub fn from_parts(parts: &Parts) -> ApiResult<Params> {
        let q = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map(|q| Params(q.0))
            .map_err(|e| {
                ApiError::new(ErrorCode::BadInput, format!("invalid query string: {e}"))
            })?;
        for (i, (k, _)) in q.0.iter().enumerate() {
            if !REPEATABLE.contains(&k.as_str()) && q.0[..i].iter().any(|(p, _)| p == k) {
                return Err(ApiError::new(
                    ErrorCode::BadInput,
                    format!("query parameter {k:?} given more than once"),
                ));
            }
        }
        Ok(q)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Params> {
        Params::from_parts(parts)
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub cluster: String,
    pub access: Access,
}

impl Caller {
    /// 403 `EFORBIDDEN` unless the caller may write.
    pub fn require_write(&self) -> ApiResult<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(ApiError::new(ErrorCode::Forbidden, "read-only token")),
        }
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> ApiResult<Caller> {
        let params = Params::from_parts(parts)?;
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        authorize(app, token, params.get("cluster"))
    }
}

fn cluster_param(requested: Option<&str>) -> ApiResult<String> {
    let name = requested.unwrap_or(DEFAULT_CLUSTER);
    validate_cluster_name(name)
        .map_err(|e| ApiError::new(ErrorCode::BadCluster, format!("invalid cluster: {e}")))?;
    Ok(name.to_string())
}

/// Decides who `token` is and which cluster the request addresses.
pub fn authorize(app: &App, token: Option<&str>, requested: Option<&str>) -> ApiResult<Caller> {
    let tokens = &app.config.tokens;
    if tokens.is_empty() {
        return Ok(Caller {
            cluster: cluster_param(requested)?,
            access: Access::ReadWrite,
        });
    }
    let token = token.filter(|t| !t.is_empty());
    let Some(grant) = token.and_then(|t| tokens.get(t)) else {
        let msg = if token.is_some() {
            "invalid token"
        } else {
            "missing Authorization header"
        };
        return Err(ApiError::new(ErrorCode::InvalidAuth, msg));
    };
    let cluster = match &grant.scope {
        ClusterScope::Any => cluster_param(requested)?,
        ClusterScope::One(c) if requested.is_none_or(|r| r == c) => c.clone(),
        ClusterScope::One(c) => {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "token is for cluster {c:?}, not {:?}",
                    requested.unwrap_or_default()
                ),
            ));
        }
    };
    Ok(Caller {
        cluster,
        access: grant.access,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Option<Parts> {
        let req = axum::http::Request::builder().uri(uri).body(()).ok()?;
        Some(req.into_parts().0)
    }

    /// A fuzz target on stable Rust: 50,000 seeded random query strings over the characters
    /// that matter (separators, escapes, the parameter names). Parsing never panics, and what it
    /// accepts never repeats a parameter other than `pgno`.
    #[test]
    fn random_query_strings_never_panic_nor_repeat_a_parameter() {
        const ATOMS: &[&str] = &[
            "db", "pgno", "pos", "id", "cluster", "=", "&", "%", "%2", "%26", "%3D", "%00", "%ff",
            "+", "a", "1", ",", "/", "..", "?", "#", "\u{e9}",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        };
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..50_000 {
            let q: String = (0..rnd(12))
                .map(|_| ATOMS[rnd(ATOMS.len() as u64) as usize])
                .collect();
            let Some(p) = parts(&format!("/db/page?{q}")) else {
                continue;
            };
            match Params::from_parts(&p) {
                Ok(params) => {
                    ok += 1;
                    for (i, (k, _)) in params.0.iter().enumerate() {
                        assert!(
                            k == "pgno" || !params.0[..i].iter().any(|(p, _)| p == k),
                            "{q:?} repeats {k:?}"
                        );
                    }
                }
                Err(e) => {
                    refused += 1;
                    assert_eq!(e.code, ErrorCode::BadInput, "{q:?}");
                }
            }
        }
        assert!(ok > 1000 && refused > 10, "ok {ok}, refused {refused}");
    }
}
