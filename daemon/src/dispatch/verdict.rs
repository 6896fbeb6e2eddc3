//! The retry verdict: what one attempt's result means for its delivery. A pure function of the policy, the
//! delivery's age and attempts, the result and a random source (for the backoff's jitter), so that every
//! rule is tested without a sink, a clock or a spool.

use std::time::Duration;

use rand::Rng;

use crate::config::RetryPolicy;
use crate::sinks::SinkError;
use crate::store::Outcome;

/// What to do with a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Verdict {
    /// The outcome to record.
    pub outcome: Outcome,
    /// The wait before the next attempt; `None` when the delivery is finished (delivered or dead).
    pub delay: Option<Duration>,
    /// The metric label (`delivered`, `dead`, `retry`).
    pub label: &'static str,
    /// Why it is dead, when retries ran out: `"N attempts"` or `"max_age"` (for the log line).
    pub gave_up: Option<String>,
}

/// Judges an attempt: `attempts` counts it, `created_at_ms` is the delivery's creation (a replay of an old
/// event gets its own horizon), `now_ms` the time of judgement.
pub(super) fn judge(
    policy: &RetryPolicy,
    created_at_ms: i64,
    now_ms: i64,
    attempts: u32,
    result: Result<(), SinkError>,
    rng: &mut impl Rng,
) -> Verdict {
    match result {
        Ok(()) => Verdict { outcome: Outcome::Delivered, delay: None, label: "delivered", gave_up: None },
        Err(SinkError::Permanent { message, .. }) => {
            Verdict { outcome: Outcome::Dead(message), delay: None, label: "dead", gave_up: None }
        }
        Err(SinkError::Retryable { message, retry_after, .. }) => {
            // A peer's Retry-After is honoured, but never beyond the policy's horizon.
            let hint = retry_after.unwrap_or_default().min(policy.max_age);
            let delay = backoff(policy, attempts, rng).max(hint);
            let age = Duration::from_millis(u64::try_from(now_ms - created_at_ms).unwrap_or(0));
            let too_old = age.saturating_add(delay) > policy.max_age;
            let too_many = policy.max_attempts.is_some_and(|max| attempts >= max);
            if too_old || too_many {
                let why = if too_many { format!("{attempts} attempts") } else { "max_age".to_owned() };
                Verdict {
                    outcome: Outcome::Dead(format!("{message} (gave up: {why})")),
                    delay: None,
                    label: "dead",
                    gave_up: Some(why),
                }
            } else {
                let next_attempt_ms = now_ms.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                Verdict {
                    outcome: Outcome::Retry { next_attempt_ms, error: message },
                    delay: Some(delay),
                    label: "retry",
                    gave_up: None,
                }
            }
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max_backoff, initial * 2^(attempt-1))]`, but
/// at least 10 ms so that a failing peer is never hammered.
pub fn backoff(policy: &RetryPolicy, attempt: u32, rng: &mut impl Rng) -> Duration {
    let exp = attempt.saturating_sub(1).min(31);
    let ceiling = policy.initial_backoff.saturating_mul(1u32 << exp).min(policy.max_backoff);
    let floor = Duration::from_millis(10).min(ceiling);
    let ms = rng.random_range(floor.as_millis() as u64..=ceiling.as_millis().max(floor.as_millis()) as u64);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
            max_attempts,
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy(None);
        let mut rng = rand::rng();
        for attempt in 1..40 {
            let d = backoff(&p, attempt, &mut rng);
            assert!(d >= Duration::from_millis(10), "{attempt}: {d:?}");
            let cap = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(Duration::from_secs(60));
            assert!(d <= cap, "{attempt}: {d:?} > {cap:?}");
        }
    }

    #[test]
    fn success_and_permanent_failure_finish_the_delivery() {
        let mut rng = rand::rng();
        let ok = judge(&policy(None), 0, 5, 1, Ok(()), &mut rng);
        assert_eq!((ok.outcome, ok.delay, ok.label), (Outcome::Delivered, None, "delivered"));
        let dead = judge(&policy(None), 0, 5, 1, Err(SinkError::permanent("no such queue")), &mut rng);
        assert_eq!(dead.outcome, Outcome::Dead("no such queue".into()));
        assert_eq!((dead.delay, dead.label, dead.gave_up), (None, "dead", None));
    }

    #[test]
    fn a_retryable_failure_is_retried_after_its_backoff() {
        let mut rng = rand::rng();
        let v = judge(&policy(Some(5)), 1_000, 2_000, 3, Err(SinkError::retryable("timeout")), &mut rng);
        let delay = v.delay.expect("retried");
        assert!(delay >= Duration::from_millis(10) && delay <= Duration::from_secs(4), "{delay:?}");
        let Outcome::Retry { next_attempt_ms, error } = v.outcome else { panic!("{:?}", v.outcome) };
        assert_eq!(error, "timeout");
        assert_eq!(next_attempt_ms, 2_000 + delay.as_millis() as i64);
        assert_eq!(v.label, "retry");
    }

    #[test]
    fn retries_run_out_by_attempts_or_by_age() {
        let mut rng = rand::rng();
        let v = judge(&policy(Some(3)), 0, 0, 3, Err(SinkError::retryable("refused")), &mut rng);
        assert_eq!(v.outcome, Outcome::Dead("refused (gave up: 3 attempts)".into()));
        assert_eq!((v.delay, v.gave_up.as_deref()), (None, Some("3 attempts")));
        // One hour old: any further wait passes max_age.
        let v = judge(&policy(None), 0, 3_600_000, 2, Err(SinkError::retryable("refused")), &mut rng);
        assert_eq!(v.outcome, Outcome::Dead("refused (gave up: max_age)".into()));
    }

    #[test]
    fn a_peers_retry_after_is_honoured_up_to_max_age() {
        let mut rng = rand::rng();
        let later = |secs| SinkError::Retryable {
            message: "busy".into(),
            status: Some(429),
            retry_after: Some(Duration::from_secs(secs)),
        };
        let v = judge(&policy(None), 0, 0, 1, Err(later(120)), &mut rng);
        assert_eq!(v.delay, Some(Duration::from_secs(120)), "longer than the backoff's 1 s ceiling");
        // A hint past the horizon is cut to max_age, which then leaves no time: dead.
        let v = judge(&policy(None), 0, 1, 1, Err(later(7200)), &mut rng);
        assert_eq!(v.label, "dead");
    }
}
