//! Who is writing: the `Cloud-Account-Id` of a request, checked against its
//! credentials from the platform REST API (`rest`, as diproxy did), a tenants
//! file (`static`), or taken on trust (`none`).
//!
//! REST answers are cached, positive and negative (`moka`, whose
//! `try_get_with` also makes concurrent misses share one lookup), and a REST
//! outage is served from a stale cache entry where one exists; otherwise it
//! is a 503 (retryable), never a 4xx that would make Prometheus drop the data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use moka::future::Cache;
use moka::Expiry;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::client::{call, http_client, CallError, Endpoint, HttpClient};
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
    Credentials(Arc<str>),
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
                let base = cfg
                    .rest_url
                    .as_deref()
                    .unwrap_or_default()
                    .trim_end_matches('/')
                    .to_string();
                Source::Rest(Box::new(RestSource::new(
                    http_client(8, None),
                    base,
                    secret,
                    cfg,
                )))
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

/// A cached answer and when the REST API gave it.
#[derive(Debug, Clone)]
struct Cached {
    answer: Answer,
    fetched: Instant,
}

/// How long an entry of [`RestSource::answers`] lives: `cache_ttl` for
/// credentials, `negative_cache_ttl` for the rest, counted from the lookup
/// (an entry recalled from [`RestSource::known`] keeps its age).
struct AnswerTtl {
    positive: Duration,
    negative: Duration,
}

impl Expiry<String, Cached> for AnswerTtl {
    fn expire_after_create(
        &self,
        _account: &String,
        c: &Cached,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        let ttl = match c.answer {
            Answer::Credentials(_) => self.positive,
            Answer::Unknown | Answer::NoCredentials => self.negative,
        };
        Some(ttl.saturating_sub(c.fetched.elapsed()))
    }
}

struct RestSource {
    client: HttpClient,
    base: String,
    /// The REST API as failures name it.
    endpoint: Endpoint,
    secret: String,
    /// Every fresh answer. Concurrent misses for one account share one
    /// lookup (`try_get_with`); a lookup whose requests are all cancelled is
    /// dropped with them, leaving nothing behind.
    answers: Cache<String, Cached>,
    /// Credentials alone, kept `cache_ttl + stale_ttl`: served during an
    /// outage, and recalled without a lookup when made-up account ids
    /// pushed a real tenant out of `answers` (only accounts that exist ever
    /// enter this cache, so made-up ids cannot evict real tenants from it).
    known: Cache<String, Cached>,
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

/// Largest REST API answer read: a cloud account without details is a few
/// KiB; anything longer is a misbehaving API, treated as an outage.
const MAX_REST_ANSWER_BYTES: usize = 1 << 20;

impl RestSource {
    fn new(client: HttpClient, base: String, secret: String, cfg: &AuthConfig) -> RestSource {
        let capacity = cfg.cache_capacity as u64;
        RestSource {
            client,
            endpoint: Endpoint::new("the REST API (auth.rest_url)", &base),
            base,
            secret,
            answers: Cache::builder()
                .max_capacity(capacity)
                .expire_after(AnswerTtl {
                    positive: cfg.cache_ttl,
                    negative: cfg.negative_cache_ttl,
                })
                .build(),
            known: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(cfg.cache_ttl + cfg.stale_ttl)
                .build(),
            outage: std::sync::Mutex::new(None),
            cfg: cfg.clone(),
        }
    }

    async fn lookup(&self, account: &str) -> Result<Answer, AuthError> {
        let looked_up = AtomicBool::new(false);
        let answer = self
            .answers
            .try_get_with_by_ref(account, self.recall_or_fetch(account, &looked_up))
            .await;
        match answer {
            Ok(c) => {
                if !looked_up.load(Ordering::Relaxed) {
                    metrics::counter!(t::AUTH_CACHE, "result" => "hit").increment(1);
                }
                Ok(c.answer)
            }
            // Outage: stale credentials beat refusing data. (A stale
            // "unknown" is not used: the account may exist by now, and a
            // 422 would make the sender drop its data.)
            Err(detail) => match self.known.get(account).await {
                Some(c) => {
                    metrics::counter!(t::AUTH_CACHE, "result" => "stale").increment(1);
                    tracing::warn!(account, error = %detail, "REST API unavailable, using cached credentials");
                    Ok(c.answer)
                }
                // Logged once, with the request's answer (server::reject).
                None => Err(AuthError::Unavailable(detail.to_string())),
            },
        }
    }

    /// The answer for an account missing from `answers`: its credentials
    /// from `known` while they are fresh, or else a REST lookup, unless the
    /// REST API failed within `auth.outage_backoff` (asking again at once
    /// would make every request pay its timeout, and a hanging API would use
    /// up the concurrency limit for everyone).
    async fn recall_or_fetch(
        &self,
        account: &str,
        looked_up: &AtomicBool,
    ) -> Result<Cached, String> {
        if let Some(c) = self.known.get(account).await {
            if c.fetched.elapsed() < self.cfg.cache_ttl {
                return Ok(c);
            }
        }
        if let Some(detail) = self.recent_outage() {
            return Err(detail);
        }
        looked_up.store(true, Ordering::Relaxed);
        metrics::counter!(t::AUTH_CACHE, "result" => "miss").increment(1);
        let fetched = Instant::now();
        match self.fetch(account).await {
            Ok(answer) => {
                let c = Cached { answer, fetched };
                match c.answer {
                    Answer::Credentials(_) => {
                        self.known.insert(account.to_string(), c.clone()).await
                    }
                    Answer::Unknown | Answer::NoCredentials => self.known.invalidate(account).await,
                }
                Ok(c)
            }
            Err(detail) => {
                if let Ok(mut o) = self.outage.lock() {
                    *o = Some((Instant::now(), detail.clone()));
                }
                Err(detail)
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
        let (status, body) = call(
            &self.client,
            req,
            &self.endpoint,
            self.cfg.rest_timeout,
            MAX_REST_ANSWER_BYTES,
        )
        .await
        .map_err(|e| match e {
            CallError::Failed(why) => why,
            CallError::TimedOut => self.endpoint.timed_out(self.cfg.rest_timeout),
        })?;
        metrics::histogram!(t::AUTH_REST_DURATION).record(started.elapsed().as_secs_f64());
        match status {
            StatusCode::OK => {
                let acc: CloudAccount = serde_json::from_slice(&body).map_err(|e| {
                    format!(
                        "{} sent an answer that is not a cloud account: {e}",
                        self.endpoint
                    )
                })?;
                match acc
                    .config
                    .and_then(|c| c.credentials)
                    .filter(|c| !c.is_empty())
                {
                    Some(c) => Ok(Answer::Credentials(c.into())),
                    None => Ok(Answer::NoCredentials),
                }
            }
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => Ok(Answer::Unknown),
            other => Err(self
                .endpoint
                .answered(other.as_u16(), &crate::client::answer_detail(&body))),
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

    /// Made-up ids fill `answers` (and push entries out of it), but a real
    /// tenant's credentials stay in `known` and are recalled from there
    /// without a lookup.
    #[tokio::test]
    async fn unknown_accounts_cannot_evict_known_ones() {
        let cfg = AuthConfig {
            cache_capacity: 2,
            ..AuthConfig::default()
        };
        // Nothing listens there: a lookup would fail and record an outage.
        let rest = RestSource::new(
            http_client(1, None),
            "http://127.0.0.1:1".into(),
            "s".into(),
            &cfg,
        );
        let real = Cached {
            answer: Answer::Credentials("c".into()),
            fetched: Instant::now(),
        };
        rest.known.insert(ID.to_string(), real.clone()).await;
        rest.answers.insert(ID.to_string(), real).await;
        for i in 0..50 {
            let made_up = Cached {
                answer: Answer::Unknown,
                fetched: Instant::now(),
            };
            rest.answers.insert(format!("made-up-{i}"), made_up).await;
        }
        rest.answers.run_pending_tasks().await;
        rest.known.run_pending_tasks().await;
        assert!(rest.answers.entry_count() <= 2);
        assert_eq!(rest.lookup(ID).await, Ok(Answer::Credentials("c".into())));
        assert_eq!(rest.recent_outage(), None, "answered without a lookup");
    }

    #[test]
    fn basic_scheme_is_case_insensitive_and_exact() {
        assert!(check_basic(Some(b"basic abc"), "abc").is_ok());
        assert!(check_basic(Some(b"Basic abcd"), "abc").is_err());
        assert!(check_basic(Some(b"Bearer abc"), "abc").is_err());
        assert!(check_basic(Some(b"Basic"), "abc").is_err());
    }
}
