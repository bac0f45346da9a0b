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
    burst: u32,
}

/// Why a request's samples were not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Over the tenant's rate: retry after this long.
    Wait(Duration),
    /// More samples than the bucket holds: this request can never pass as
    /// it is, however long the sender waits.
    OverBurst { samples: u64, burst: u32 },
}

impl TenantLimiter {
    pub fn new(cfg: &LimitsConfig) -> Self {
        let limiter = NonZeroU32::new(cfg.tenant_samples_per_sec).map(|rate| {
            let burst = NonZeroU32::new(cfg.tenant_burst_samples).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        TenantLimiter {
            limiter,
            burst: cfg.tenant_burst_samples,
        }
    }

    /// Takes `samples` tokens from the tenant's bucket, or says how long to
    /// wait (or that waiting cannot help).
    pub fn check(&self, tenant: &str, samples: u64) -> Result<(), Exceeded> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let over_burst = Exceeded::OverBurst {
            samples,
            burst: self.burst,
        };
        let Ok(n) = u32::try_from(samples) else {
            return Err(over_burst);
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        // `to_owned` only on this path; the limit is off by default.
        match limiter.check_key_n(&tenant.to_owned(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Exceeded::Wait(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            // Larger than the whole bucket: it can never pass at once.
            Err(_) => Err(over_burst),
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
        let Err(Exceeded::Wait(wait)) = l.check("a", 500) else {
            panic!("over the rate: wait");
        };
        assert!(
            wait > Duration::from_secs(4) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        assert!(
            l.check("b", 1000).is_ok(),
            "another tenant has its own bucket"
        );
        assert_eq!(
            l.check("c", 5000),
            Err(Exceeded::OverBurst {
                samples: 5000,
                burst: 1000
            }),
            "larger than the bucket"
        );
    }
}
