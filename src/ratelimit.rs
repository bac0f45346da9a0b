//! Per-tenant ingestion rate limit: a token bucket of samples per tenant
//! (GCRA, from the `governor` crate), shared by all of a tenant's requests on
//! this replica.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitsConfig;

pub struct TenantLimiter {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl TenantLimiter {
    pub fn new(cfg: &LimitsConfig) -> Self {
        let limiter = NonZeroU32::new(cfg.tenant_samples_per_sec).map(|rate| {
            let burst = NonZeroU32::new(cfg.tenant_burst_samples).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        TenantLimiter { limiter }
    }

    /// Takes `samples` tokens from the tenant's bucket, or says how long to wait.
    pub fn check(&self, tenant: &str, samples: u64) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(samples.min(u64::from(u32::MAX)) as u32) else {
            return Ok(());
        };
        // `to_owned` only on this path; the limit is off by default.
        match limiter.check_key_n(&tenant.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
            // Larger than the whole bucket: it can never pass at once.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// Forgets tenants whose buckets are full again (bounds memory).
    pub fn forget_idle(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default() {
        let l = TenantLimiter::new(&LimitsConfig::default());
        assert!(l.check("a", 1_000_000_000).is_ok());
    }

    #[test]
    fn limits_each_tenant_separately() {
        let cfg = LimitsConfig {
            tenant_samples_per_sec: 100,
            tenant_burst_samples: 1000,
            ..LimitsConfig::default()
        };
        let l = TenantLimiter::new(&cfg);
        assert!(l.check("a", 1000).is_ok());
        let wait = l.check("a", 500).unwrap_err();
        assert!(
            wait > Duration::from_secs(4) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        assert!(
            l.check("b", 1000).is_ok(),
            "another tenant has its own bucket"
        );
        assert!(l.check("c", 5000).is_err(), "larger than the bucket");
    }
}
