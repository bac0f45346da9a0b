//! Admission: how many write requests run at once, in all and per tenant.
//!
//! A request is admitted once its tenant header is read, before auth and
//! body reading (which count: a slow body holds its place), and beyond
//! either limit it is shed with 503 rather than queued. The [`Admitted`]
//! guard gives its place back when it is dropped — when the request is
//! answered, or cancelled because the sender hung up — and keeps the
//! `rwgate_requests_in_flight` gauge with it.
//!
//! Why not tower's `ConcurrencyLimit` and `LoadShed`: they hold one
//! semaphore for all requests, taken before the handler sees the request;
//! the tenant's share needs the tenant, which is known only from the
//! header. One small lock over two counts does both limits and the gauge.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::LimitsConfig;
use crate::error::ApiError;
use crate::telemetry as t;

/// The concurrency limits and who holds what.
pub struct Admission {
    max_total: usize,
    max_per_tenant: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_tenant: HashMap<String, usize>,
}

/// A request's place; released on drop.
pub struct Admitted<'a> {
    admission: &'a Admission,
    tenant: &'a str,
}

impl Admission {
    pub fn new(cfg: &LimitsConfig) -> Admission {
        let max_total = cfg.max_concurrent_requests;
        let share = (max_total as f64 * cfg.tenant_max_concurrent_share).floor() as usize;
        Admission {
            max_total,
            max_per_tenant: share.clamp(1, max_total.max(1)),
            held: Mutex::new(Held::default()),
        }
    }

    /// Most requests one tenant may have in flight.
    pub fn max_per_tenant(&self) -> usize {
        self.max_per_tenant
    }

    /// Admits a request of `tenant`, or says which limit it is over.
    pub fn admit<'a>(&'a self, tenant: &'a str) -> Result<Admitted<'a>, ApiError> {
        let mut held = self.held.lock().map_err(|_| ApiError::Overloaded)?;
        if held.total >= self.max_total {
            return Err(ApiError::Overloaded);
        }
        match held.by_tenant.get_mut(tenant) {
            Some(n) if *n >= self.max_per_tenant => return Err(ApiError::TenantOverloaded),
            Some(n) => *n += 1,
            None => {
                held.by_tenant.insert(tenant.to_owned(), 1);
            }
        }
        held.total += 1;
        metrics::gauge!(t::IN_FLIGHT).increment(1.0);
        Ok(Admitted {
            admission: self,
            tenant,
        })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        metrics::gauge!(t::IN_FLIGHT).decrement(1.0);
        let Ok(mut held) = self.admission.held.lock() else {
            return;
        };
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_tenant.get_mut(self.tenant) {
            *n -= 1;
            if *n == 0 {
                held.by_tenant.remove(self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, share: f64) -> Admission {
        Admission::new(&LimitsConfig {
            max_concurrent_requests: max,
            tenant_max_concurrent_share: share,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn a_tenant_holds_at_most_its_share_and_gives_it_back() {
        let a = admission(4, 0.5);
        let first = a.admit("a").unwrap();
        let _second = a.admit("a").unwrap();
        assert!(matches!(a.admit("a"), Err(ApiError::TenantOverloaded)));
        let _b1 = a.admit("b").unwrap();
        let _b2 = a.admit("b").unwrap();
        assert!(matches!(a.admit("c"), Err(ApiError::Overloaded)));
        drop(first);
        let _again = a.admit("a").unwrap();
        assert_eq!(a.held.lock().unwrap().total, 4);
    }

    #[test]
    fn every_tenant_gets_at_least_one_and_idle_tenants_are_forgotten() {
        let a = admission(1, 0.1);
        assert_eq!(a.max_per_tenant(), 1);
        drop(a.admit("a").unwrap());
        assert!(a.held.lock().unwrap().by_tenant.is_empty());
        assert_eq!(admission(256, 0.5).max_per_tenant(), 128);
        assert_eq!(admission(3, 1.0).max_per_tenant(), 3);
    }
}
