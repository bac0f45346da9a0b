//! Who is writing: the `Cloud-Account-Id` of a request, checked against its
//! credentials from the platform REST API (`rest`, as diproxy did), a tenants
//! file (`static`), or taken on trust (`none`).
//!
//! REST answers are cached, positive and negative, and a REST outage is served
//! from a stale cache entry where one exists; otherwise it is a 503 (retryable),
//! never a 4xx that would make Prometheus drop the data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::client::{http_client, HttpClient};
use crate::config::{AuthConfig, AuthMode};
use crate::filter::Allowlist;
use crate::telemetry as t;

/// An authenticated tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: Arc<str>,
    /// The tenant's own allowlist, replacing the global one (static mode).
    pub allowlist: Option<Arc<Allowlist>>,
}

/// Why a tenant was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown Cloud-Account-Id: no such cloud account")]
    UnknownAccount,
    #[error("this cloud account has no remote-write credentials; set them in the platform")]
    NoCredentials,
    #[error("invalid credentials for this Cloud-Account-Id")]
    BadCredentials,
    /// The credential source is down and nothing is cached. The detail is
    /// logged, not sent.
    #[error("cannot verify credentials right now; retry later")]
    Unavailable(String),
}

/// What the credential source says about an account.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Base64 of `user:password`, compared with `Authorization: Basic ...`.
    Credentials(String),
    Unknown,
    NoCredentials,
}

/// Authenticates requests; cheap to share behind an `Arc`.
pub struct Authenticator {
    source: Source,
}

enum Source {
    None,
    Static(HashMap<String, StaticTenant>),
    Rest(Box<RestSource>),
}

struct StaticTenant {
    credentials: String,
    allowlist: Option<Arc<Allowlist>>,
}

/// The tenants file of `static` mode.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenant: Vec<TenantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    /// The Cloud-Account-Id (a UUID).
    id: String,
    /// Base64 of `user:password`.
    credentials: String,
    /// Optional `__name__` allowlist replacing the global one for this tenant.
    allowlist: Option<String>,
}

/// Errors loading the auth source at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Authenticator {
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, AuthSetupError> {
        let source = match cfg.mode {
            AuthMode::None => Source::None,
            AuthMode::Static => {
                let path = cfg
                    .tenants_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""));
                let text = read(path)?;
                Source::Static(parse_tenants(&text, &path.display().to_string())?)
            }
            AuthMode::Rest => {
                let path = cfg
                    .cluster_secret_file
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""));
                let secret = read(path)?.trim().to_string();
                if secret.is_empty() {
                    return Err(AuthSetupError::Invalid {
                        path: path.display().to_string(),
                        message: "the cluster secret file is empty".into(),
                    });
                }
                Source::Rest(Box::new(RestSource {
                    client: http_client(8, None),
                    base: cfg
                        .rest_url
                        .clone()
                        .unwrap_or_default()
                        .trim_end_matches('/')
                        .to_string(),
                    secret,
                    cache: DashMap::new(),
                    negative: DashMap::new(),
                    inflight: DashMap::new(),
                    outage: std::sync::Mutex::new(None),
                    cfg: cfg.clone(),
                }))
            }
        };
        Ok(Authenticator { source })
    }

    /// A static authenticator from a tenants-file text (tests, `check-config`).
    pub fn from_tenants_toml(text: &str) -> Result<Self, AuthSetupError> {
        Ok(Authenticator {
            source: Source::Static(parse_tenants(text, "tenants")?),
        })
    }

    /// Checks the `Authorization` header of a request for `account` (already
    /// known to be a UUID).
    pub async fn authenticate(
        &self,
        account: &str,
        authorization: Option<&[u8]>,
    ) -> Result<Tenant, AuthError> {
        match &self.source {
            Source::None => Ok(Tenant {
                id: account.into(),
                allowlist: None,
            }),
            Source::Static(tenants) => {
                let t = tenants.get(account).ok_or(AuthError::UnknownAccount)?;
                check_basic(authorization, &t.credentials)?;
                Ok(Tenant {
                    id: account.into(),
                    allowlist: t.allowlist.clone(),
                })
            }
            Source::Rest(rest) => match rest.lookup(account).await? {
                Answer::Unknown => Err(AuthError::UnknownAccount),
                Answer::NoCredentials => Err(AuthError::NoCredentials),
                Answer::Credentials(c) => {
                    check_basic(authorization, &c)?;
                    Ok(Tenant {
                        id: account.into(),
                        allowlist: None,
                    })
                }
            },
        }
    }
}

fn read(path: &std::path::Path) -> Result<String, AuthSetupError> {
    std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn parse_tenants(text: &str, path: &str) -> Result<HashMap<String, StaticTenant>, AuthSetupError> {
    let invalid = |message: String| AuthSetupError::Invalid {
        path: path.to_string(),
        message,
    };
    let file: TenantsFile = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
    let mut out = HashMap::new();
    for (i, t) in file.tenant.into_iter().enumerate() {
        let id = uuid::Uuid::parse_str(&t.id)
            .map_err(|_| invalid(format!("tenant[{i}].id {:?} is not a UUID", t.id)))?
            .hyphenated()
            .to_string();
        if t.credentials.trim().is_empty() {
            return Err(invalid(format!("tenant[{i}].credentials is empty")));
        }
        let allowlist = t
            .allowlist
            .as_deref()
            .map(|a| {
                Allowlist::new(a)
                    .map(Arc::new)
                    .map_err(|e| invalid(format!("tenant[{i}].allowlist: {e}")))
            })
            .transpose()?;
        let entry = StaticTenant {
            credentials: t.credentials.trim().to_string(),
            allowlist,
        };
        if out.insert(id.clone(), entry).is_some() {
            return Err(invalid(format!("tenant[{i}].id {id} is listed twice")));
        }
    }
    Ok(out)
}

/// Compares `Authorization` with `Basic <credentials>` in constant time.
fn check_basic(authorization: Option<&[u8]>, credentials: &str) -> Result<(), AuthError> {
    let given = authorization.ok_or(AuthError::BadCredentials)?;
    let Some(token) = given
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case(b"basic "))
        .map(|_| given[6..].trim_ascii())
    else {
        return Err(AuthError::BadCredentials);
    };
    if bool::from(token.ct_eq(credentials.as_bytes())) {
        Ok(())
    } else {
        Err(AuthError::BadCredentials)
    }
}

struct CacheEntry {
    answer: Answer,
    fetched: Instant,
}

struct RestSource {
    client: HttpClient,
    base: String,
    secret: String,
    /// Known accounts (credentials), kept up to `cache_ttl + stale_ttl`.
    cache: DashMap<String, CacheEntry>,
    /// Unknown accounts and accounts without credentials.
    negative: DashMap<String, CacheEntry>,
    /// One lookup per account at a time: concurrent misses wait for it.
    inflight: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// When and why the REST API last failed. For `auth.outage_backoff` after
    /// it, lookups are not sent: stale entries are served, others get 503.
    outage: std::sync::Mutex<Option<(Instant, String)>>,
    cfg: AuthConfig,
}

#[derive(Deserialize)]
struct CloudAccount {
    #[serde(default)]
    config: Option<AccountConfig>,
}

#[derive(Deserialize)]
struct AccountConfig {
    #[serde(default)]
    credentials: Option<String>,
}

impl RestSource {
    fn fresh(&self, account: &str) -> Option<Answer> {
        if let Some(e) = self.cache.get(account) {
            return (e.fetched.elapsed() < self.cfg.cache_ttl).then(|| e.answer.clone());
        }
        let e = self.negative.get(account)?;
        (e.fetched.elapsed() < self.cfg.negative_cache_ttl).then(|| e.answer.clone())
    }

    async fn lookup(&self, account: &str) -> Result<Answer, AuthError> {
        if let Some(a) = self.fresh(account) {
            metrics::counter!(t::AUTH_CACHE, "result" => "hit").increment(1);
            return Ok(a);
        }
        let lock = self
            .inflight
            .entry(account.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let guard = lock.lock().await;
        // Someone else may have fetched it while we waited.
        if let Some(a) = self.fresh(account) {
            metrics::counter!(t::AUTH_CACHE, "result" => "hit").increment(1);
            return Ok(a);
        }
        // Or the REST API failed just now (for any account): asking again at
        // once would make every request pay its timeout, and a hanging API
        // would use up the concurrency limit for everyone.
        let result = match self.recent_outage() {
            Some(detail) => Err(detail),
            None => {
                metrics::counter!(t::AUTH_CACHE, "result" => "miss").increment(1);
                let result = self.fetch(account).await;
                if let Err(detail) = &result {
                    if let Ok(mut o) = self.outage.lock() {
                        *o = Some((Instant::now(), detail.clone()));
                    }
                }
                result
            }
        };
        drop(guard);
        self.inflight
            .remove_if(account, |_, l| Arc::strong_count(l) <= 2);
        match result {
            Ok(answer) => {
                self.insert(account, answer.clone());
                Ok(answer)
            }
            Err(detail) => {
                // Outage: stale credentials beat refusing data. (A stale
                // "unknown" is not used: the account may exist by now, and a
                // 422 would make the sender drop its data.)
                let stale = self.cache.get(account).and_then(|e| {
                    (e.fetched.elapsed() < self.cfg.cache_ttl + self.cfg.stale_ttl)
                        .then(|| e.answer.clone())
                });
                match stale {
                    Some(a) => {
                        metrics::counter!(t::AUTH_CACHE, "result" => "stale").increment(1);
                        tracing::warn!(account, error = %detail, "REST API unavailable, using cached credentials");
                        Ok(a)
                    }
                    None => {
                        tracing::error!(account, error = %detail, "REST API unavailable and nothing cached");
                        Err(AuthError::Unavailable(detail))
                    }
                }
            }
        }
    }

    /// The last REST failure, if it is within `auth.outage_backoff`.
    fn recent_outage(&self) -> Option<String> {
        let o = self.outage.lock().ok()?;
        o.as_ref()
            .filter(|(at, _)| at.elapsed() < self.cfg.outage_backoff)
            .map(|(_, detail)| detail.clone())
    }

    /// Caches an answer. Known accounts and unknown ones are kept apart, so
    /// that requests with made-up account ids (each a REST lookup and a
    /// negative entry) can never evict the credentials of real tenants.
    fn insert(&self, account: &str, answer: Answer) {
        let entry = CacheEntry {
            answer,
            fetched: Instant::now(),
        };
        let (map, keep_for) = match entry.answer {
            Answer::Credentials(_) => {
                self.negative.remove(account);
                (&self.cache, self.cfg.cache_ttl + self.cfg.stale_ttl)
            }
            _ => {
                self.cache.remove(account);
                (&self.negative, self.cfg.negative_cache_ttl)
            }
        };
        if map.len() >= self.cfg.cache_capacity {
            map.retain(|_, e| e.fetched.elapsed() < keep_for);
            if map.len() >= self.cfg.cache_capacity {
                map.clear();
            }
        }
        map.insert(account.to_string(), entry);
    }

    /// One REST lookup. `Err` means the source could not answer (outage or
    /// misconfiguration), which must not be blamed on the client.
    async fn fetch(&self, account: &str) -> Result<Answer, String> {
        let url = format!(
            "{}/restapi/v2/cloud_accounts/{account}?details=false",
            self.base
        );
        let req = Request::get(&url)
            .header("Secret", &self.secret)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("building request: {e}"))?;
        let started = Instant::now();
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.cfg.rest_timeout, call)
            .await
            .map_err(|_| {
                format!(
                    "timed out after {}",
                    crate::clock::HumanDuration(self.cfg.rest_timeout)
                )
            })??;
        metrics::histogram!(t::AUTH_REST_DURATION).record(started.elapsed().as_secs_f64());
        match status {
            StatusCode::OK => {
                let acc: CloudAccount = serde_json::from_slice(&body)
                    .map_err(|e| format!("REST API answer is not a cloud account: {e}"))?;
                match acc
                    .config
                    .and_then(|c| c.credentials)
                    .filter(|c| !c.is_empty())
                {
                    Some(c) => Ok(Answer::Credentials(c)),
                    None => Ok(Answer::NoCredentials),
                }
            }
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => Ok(Answer::Unknown),
            other => Err(format!("REST API answered {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1b2c3d-0000-4000-8000-000000000001";

    #[tokio::test]
    async fn static_tenants() {
        let a = Authenticator::from_tenants_toml(&format!(
            "[[tenant]]\nid = \"{ID}\"\ncredentials = \"dXNlcjpwYXNz\"\nallowlist = \"up\"\n"
        ))
        .unwrap();
        let t = a
            .authenticate(ID, Some(b"Basic dXNlcjpwYXNz"))
            .await
            .unwrap();
        assert_eq!(&*t.id, ID);
        assert!(t.allowlist.unwrap().keeps(Some(b"up")));
        assert_eq!(
            a.authenticate(ID, Some(b"Basic bm9wZTpub3Bl"))
                .await
                .unwrap_err(),
            AuthError::BadCredentials
        );
        assert_eq!(
            a.authenticate(ID, None).await.unwrap_err(),
            AuthError::BadCredentials
        );
        assert_eq!(
            a.authenticate(
                "6f1b2c3d-0000-4000-8000-000000000002",
                Some(b"Basic dXNlcjpwYXNz")
            )
            .await
            .unwrap_err(),
            AuthError::UnknownAccount
        );
    }

    #[test]
    fn tenants_file_errors_name_the_entry() {
        let e =
            Authenticator::from_tenants_toml("[[tenant]]\nid = \"nope\"\ncredentials = \"x\"\n")
                .err()
                .unwrap();
        assert!(e.to_string().contains("tenant[0].id"), "{e}");
        let e = Authenticator::from_tenants_toml(&format!(
            "[[tenant]]\nid = \"{ID}\"\ncredentials = \"x\"\nallowlist = \"(\"\n"
        ))
        .err()
        .unwrap();
        assert!(e.to_string().contains("tenant[0].allowlist"), "{e}");
    }

    #[test]
    fn unknown_accounts_cannot_evict_known_ones() {
        let cfg = AuthConfig {
            cache_capacity: 2,
            ..AuthConfig::default()
        };
        let rest = RestSource {
            client: http_client(1, None),
            base: String::new(),
            secret: String::new(),
            cache: DashMap::new(),
            negative: DashMap::new(),
            inflight: DashMap::new(),
            outage: std::sync::Mutex::new(None),
            cfg,
        };
        rest.insert(ID, Answer::Credentials("c".into()));
        for i in 0..10 {
            rest.insert(&format!("made-up-{i}"), Answer::Unknown);
        }
        assert_eq!(rest.fresh(ID), Some(Answer::Credentials("c".into())));
        assert!(rest.negative.len() <= 2);
        assert_eq!(rest.fresh("made-up-9"), Some(Answer::Unknown));
    }

    #[test]
    fn basic_scheme_is_case_insensitive_and_exact() {
        assert!(check_basic(Some(b"basic abc"), "abc").is_ok());
        assert!(check_basic(Some(b"Basic abcd"), "abc").is_err());
        assert!(check_basic(Some(b"Bearer abc"), "abc").is_err());
        assert!(check_basic(Some(b"Basic"), "abc").is_err());
    }
}
