//! The platform REST API's resource registry, as the rollup uses it:
//! `POST {rest_url}/restapi/v2/cloud_accounts/{account}/cloud_resources/bulk
//! ?behavior=skip_existing&return_resources=true&is_report_import=true`
//! with the `Secret` header and the body `{"resources": [...]}`.
//!
//! The contract (OptScale `rest_api_server/handlers/v2/cloud_resources_bulk.py`
//! and `controllers/cloud_resource.py`): `cloud_resource_id` (1-512 chars),
//! `resource_type` (1-255) and `name` (1-512) are required; `service_name`,
//! `region`, `k8s_namespace`, `k8s_node`, `k8s_service` (1-255 chars, not
//! blank), `tags` and `meta` (objects; for `K8s Pod` only the pod model's
//! fields are allowed in `meta`), `first_seen` and `last_seen` (integers
//! 0..2^31-1) are optional; any other key is refused with 400 `OE0212`. A
//! key sent as `null` passes its check and is stored as null, so optional
//! fields are left out rather than sent empty. `skip_existing` upserts on
//! (account, `cloud_resource_id`): new resources get a fresh id, existing
//! ones keep theirs with `first_seen` the minimum and `last_seen` the
//! maximum of the stored and sent values; the answer lists every resource
//! sent, new or existing, with its `id`. 401 without a secret, 403 with a
//! wrong one, 404 for an unknown account.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use crate::client::{answer_detail, call, http_client, CallError, Endpoint, HttpClient};
use crate::telemetry as t;

/// Largest answer read (200 resources with their documents fit many times).
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Longest `name` and `cloud_resource_id` the platform accepts (characters).
pub const MAX_NAME_CHARS: usize = 512;
/// Longest `resource_type`, `service_name`, `region` and `k8s_*` value.
pub const MAX_FIELD_CHARS: usize = 255;
/// Largest `first_seen`/`last_seen` (the platform checks 32-bit integers).
pub const MAX_SEEN: i64 = i32::MAX as i64;

/// One resource of a bulk call, with exactly the keys the platform allows;
/// `None` fields are left out (never sent as null).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewResource {
    pub cloud_resource_id: String,
    pub resource_type: &'static str,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k8s_node: Option<String>,
}

/// A string field the platform would accept (1..=`max` characters, not
/// blank), or `None` to leave it out.
pub fn field(value: &str, max: usize) -> Option<String> {
    let ok = !value.trim().is_empty() && value.chars().count() <= max;
    ok.then(|| value.to_string())
}

/// `prefix` + `value`, cut to `max` characters (names are display text).
pub fn name(prefix: &str, value: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + value.len());
    s.push_str(prefix);
    s.extend(value.chars().take(MAX_NAME_CHARS - prefix.chars().count()));
    s
}

/// A resource as the bulk answer lists it (other keys are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Registered {
    pub id: String,
    pub cloud_resource_id: String,
    #[serde(default)]
    pub first_seen: Option<i64>,
    #[serde(default)]
    pub last_seen: Option<i64>,
}

#[derive(Serialize)]
struct Body<'a> {
    resources: &'a [NewResource],
}

#[derive(Deserialize)]
struct Answer {
    resources: Vec<Registered>,
}

/// Why a bulk call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BulkError {
    #[error("{}", .at.answered(*.status, .detail))]
    Status {
        at: Endpoint,
        status: u16,
        detail: String,
    },
    #[error("{}", .at.timed_out(*.after))]
    Timeout { at: Endpoint, after: Duration },
    /// No answer (the text names the API and says why).
    #[error("{0}")]
    Transport(String),
    #[error("{at}: {detail}")]
    Answer { at: Endpoint, detail: String },
}

/// Whom a failure holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every account: the API is down, overloaded or refuses our secret.
    Everyone,
    /// This account only: the platform does not know it (404), or its
    /// answer was unusable.
    Account,
    /// This batch's content (400): bisect to find the resource at fault.
    Content,
}

impl BulkError {
    pub fn scope(&self) -> Scope {
        match self {
            BulkError::Status { status: 404, .. } | BulkError::Answer { .. } => Scope::Account,
            BulkError::Status { status: 400, .. } => Scope::Content,
            _ => Scope::Everyone,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BulkError::Status { status: 404, .. } => "not_found",
            BulkError::Status { status: 400, .. } => "refused",
            BulkError::Status {
                status: 401 | 403, ..
            } => "secret",
            BulkError::Status { .. } => "status",
            BulkError::Timeout { .. } => "timeout",
            BulkError::Transport(_) => "transport",
            BulkError::Answer { .. } => "answer",
        }
    }
}

/// The bulk endpoint's client; cheap to clone.
#[derive(Clone)]
pub struct PlatformApi {
    client: HttpClient,
    base: String,
    /// The API as failures name it.
    at: Endpoint,
    secret: String,
    timeout: Duration,
}

impl PlatformApi {
    pub fn new(base: &str, secret: String, timeout: Duration) -> PlatformApi {
        PlatformApi {
            client: http_client(8, None),
            base: base.trim_end_matches('/').to_string(),
            at: Endpoint::new("the REST API (resources.rest_url)", base),
            secret,
            timeout,
        }
    }

    /// Registers (or refreshes) `resources` of `account` and returns the
    /// platform's record of each, in the order sent. An answer lacking a
    /// resource sent is an error: no row may go out under a guessed id.
    pub async fn bulk(
        &self,
        account: &str,
        resources: &[NewResource],
    ) -> Result<Vec<Registered>, BulkError> {
        // Accounts are UUIDs (the request path checks); anything else would
        // not be a path segment.
        let account = uuid::Uuid::try_parse(account)
            .map_err(|_| BulkError::Status {
                at: self.at.clone(),
                status: 404,
                detail: format!("{account:?} is not a cloud account id"),
            })?
            .hyphenated()
            .to_string();
        let url = format!(
            "{}/restapi/v2/cloud_accounts/{account}/cloud_resources/bulk\
             ?behavior=skip_existing&return_resources=true&is_report_import=true",
            self.base
        );
        let body = serde_json::to_vec(&Body { resources })
            .map_err(|e| self.unusable(format!("cannot encode the request: {e}")))?;
        let req = Request::post(&url)
            .header("Secret", &self.secret)
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| BulkError::Transport(format!("cannot call {}: {e}", self.at)))?;
        let started = Instant::now();
        let (status, body) = call(&self.client, req, &self.at, self.timeout, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                CallError::Failed(why) => BulkError::Transport(why),
                CallError::TimedOut => BulkError::Timeout {
                    at: self.at.clone(),
                    after: self.timeout,
                },
            })?;
        metrics::histogram!(t::RESOURCES_BULK_DURATION).record(started.elapsed().as_secs_f64());
        if status != StatusCode::OK {
            return Err(BulkError::Status {
                at: self.at.clone(),
                status: status.as_u16(),
                detail: answer_detail(&body),
            });
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| self.unusable(format!("its answer is not a resource list: {e}")))?;
        let mut by_id: std::collections::HashMap<String, Registered> = answer
            .resources
            .into_iter()
            .map(|r| (r.cloud_resource_id.clone(), r))
            .collect();
        resources
            .iter()
            .map(|r| {
                by_id
                    .remove(&r.cloud_resource_id)
                    .filter(|got| !got.id.is_empty())
                    .ok_or_else(|| {
                        self.unusable(format!("its answer lacks {}", r.cloud_resource_id))
                    })
            })
            .collect()
    }

    fn unusable(&self, detail: String) -> BulkError {
        BulkError::Answer {
            at: self.at.clone(),
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_fields_are_left_out_not_null() {
        let r = NewResource {
            cloud_resource_id: "k8s-ns-0123456789abcdef".into(),
            resource_type: "K8s Namespace",
            name: "Namespace: web".into(),
            service_name: None,
            meta: None,
            first_seen: Some(1),
            last_seen: None,
            k8s_namespace: field("   ", MAX_FIELD_CHARS),
            k8s_node: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["cloud_resource_id", "first_seen", "name", "resource_type"]
        );
    }

    #[test]
    fn fields_and_names_fit_the_platform() {
        assert_eq!(field("web", 255).as_deref(), Some("web"));
        assert_eq!(field("", 255), None);
        assert_eq!(field(" \t", 255), None);
        assert_eq!(
            field(&"é".repeat(255), 255).map(|s| s.chars().count()),
            Some(255)
        );
        assert_eq!(field(&"é".repeat(256), 255), None);
        let n = name("Namespace: ", &"x".repeat(1000));
        assert_eq!(n.chars().count(), MAX_NAME_CHARS);
        assert!(n.starts_with("Namespace: x"));
        assert_eq!(name("Namespace: ", "web"), "Namespace: web");
    }

    #[test]
    fn failures_are_scoped() {
        let at = || Endpoint::new("the REST API", "http://127.0.0.1:1");
        let st = |status| BulkError::Status {
            at: at(),
            status,
            detail: String::new(),
        };
        assert_eq!(st(404).scope(), Scope::Account);
        assert_eq!(st(400).scope(), Scope::Content);
        for s in [401, 403, 429, 500, 502, 503] {
            assert_eq!(st(s).scope(), Scope::Everyone, "{s}");
        }
        let timeout = BulkError::Timeout {
            at: at(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.scope(), Scope::Everyone);
    }

    /// Each failure names the API (its URL without credentials), and a
    /// timeout reads as people write durations.
    #[test]
    fn failures_name_the_api() {
        let at = Endpoint::new("the REST API", "http://u:pw@rest:8999/");
        let e = BulkError::Status {
            at: at.clone(),
            status: 500,
            detail: "no detail".into(),
        };
        assert_eq!(
            e.to_string(),
            "the REST API at http://***@rest:8999/ answered 500 Internal Server Error: no detail"
        );
        let e = BulkError::Timeout {
            at,
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            e.to_string(),
            "the REST API at http://***@rest:8999/ did not answer within 1s 500ms"
        );
    }
}
