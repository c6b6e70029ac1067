//! When the owner's live rounds stop and the quiesce comes: a pure decision
//! taken after every live round, from what the round sent, how long it
//! took and what the app dirtied meanwhile.
//!
//! - The final round is predicted to fit the downtime budget at the rate the
//!   last round went out, less what the puller said it needs after the
//!   final round: quiesce.
//! - What is left shrank: another round.
//! - It did not (the app writes about as fast as the link drains, or faster),
//!   or the rounds ran out: with auto-converge, throttle the app's writes in
//!   volfs — to what lets a round as long as the last one leave no more than
//!   the budget's worth, and at most half the app's own rate; halved again
//!   each round that still does not shrink — and go on, up to
//!   [`MAX_THROTTLED_ROUNDS`] more rounds. Without it, quiesce.
//!
//! QEMU's auto-converge does the same to a VM's vCPUs; here the filesystem
//! holds write replies (`volfs::throttle`).

use std::time::Duration;

/// Live rounds past `max_live_rounds` a throttled handover may run.
pub const MAX_THROTTLED_ROUNDS: u32 = 8;

/// Lowest throttle asked of volfs, bytes/s (volfs's own floor).
pub const MIN_THROTTLE: u64 = volfs::throttle::MIN_RATE;

/// What decides.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The downtime the final round should fit.
    pub max_downtime: Duration,
    /// Unthrottled live rounds at most.
    pub max_live_rounds: u32,
    /// Throttle the app when the rounds do not converge.
    pub auto_converge: bool,
    /// The part of the downtime that is not the final round's transfer (the
    /// puller's verify, mount, activation, release round trip, as it says):
    /// the transfer gets what is left of `max_downtime`.
    pub overhead: Duration,
}

impl Policy {
    /// The time the final round's transfer may take.
    fn budget(&self) -> Duration {
        self.max_downtime.saturating_sub(self.overhead)
    }
}

/// One live round, as the owner saw it.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Its number, from 1.
    pub n: u32,
    /// Bytes it sent.
    pub sent: u64,
    /// From the start of its diff to its last frame sent.
    pub took: Duration,
    /// Dirty bytes left when it ended (what the app wrote meanwhile).
    pub left: u64,
    /// The throttle in force during it, bytes/s; 0: none.
    pub throttle: u64,
}

impl Round {
    /// The rate the round went out at, bytes/s.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.took.as_secs_f64().max(1e-3)
    }

    /// How long sending what is left would take at that rate.
    pub fn predicted(&self) -> Duration {
        Duration::from_secs_f64(self.left as f64 / self.rate().max(1.0))
    }
}

/// What comes after a live round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Freeze the app and send the final round.
    Quiesce(Why),
    /// Another live round.
    Round {
        /// The app's writes held to this rate, bytes/s; 0: not throttled.
        throttle: u64,
    },
}

/// Why the live rounds ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The final round is predicted to fit the budget.
    Fits,
    /// No more rounds allowed.
    OutOfRounds,
    /// What is left does not shrink and auto-converge is off.
    NotConverging,
}

/// The decision after round `r`; see the module docs.
pub fn after(p: &Policy, r: &Round) -> Next {
    if r.predicted() <= p.budget() {
        return Next::Quiesce(Why::Fits);
    }
    let shrinking = r.left < r.sent;
    if !p.auto_converge {
        return if !shrinking {
            Next::Quiesce(Why::NotConverging)
        } else if r.n >= p.max_live_rounds {
            Next::Quiesce(Why::OutOfRounds)
        } else {
            Next::Round { throttle: 0 }
        };
    }
    if r.n >= p.max_live_rounds + MAX_THROTTLED_ROUNDS {
        return Next::Quiesce(Why::OutOfRounds);
    }
    if shrinking && (r.n < p.max_live_rounds || r.throttle != 0) {
        // Converging by itself, or under the throttle it has.
        return Next::Round {
            throttle: r.throttle,
        };
    }
    // A round as long as this one should leave what fits the budget.
    let secs = r.took.as_secs_f64().max(1e-3);
    let goal = r.rate() * p.budget().as_secs_f64() / secs;
    let writes = r.left as f64 / secs;
    let from = if r.throttle == 0 {
        writes
    } else {
        r.throttle as f64
    };
    let t = (from / 2.0).min(goal).max(MIN_THROTTLE as f64) as u64;
    Next::Round { throttle: t }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn policy(auto_converge: bool) -> Policy {
        Policy {
            max_downtime: Duration::from_millis(100),
            max_live_rounds: 8,
            auto_converge,
            overhead: Duration::ZERO,
        }
    }

    /// A round that sent `sent` bytes in `ms` and left `left`.
    fn round(n: u32, sent: u64, ms: u64, left: u64, throttle: u64) -> Round {
        Round {
            n,
            sent,
            took: Duration::from_millis(ms),
            left,
            throttle,
        }
    }

    #[test]
    fn what_fits_the_budget_is_the_final_round() {
        // 10 MB/s; 0.5 MB left: 50 ms.
        let r = round(1, 10 * MB, 1000, MB / 2, 0);
        assert_eq!(after(&policy(true), &r), Next::Quiesce(Why::Fits));
        assert_eq!(after(&policy(false), &r), Next::Quiesce(Why::Fits));
    }

    #[test]
    fn a_shrinking_rest_gets_another_round_unthrottled() {
        let r = round(1, 10 * MB, 1000, 3 * MB, 0);
        assert_eq!(after(&policy(true), &r), Next::Round { throttle: 0 });
        assert_eq!(after(&policy(false), &r), Next::Round { throttle: 0 });
    }

    #[test]
    fn an_app_that_out_writes_the_link_is_throttled_until_a_round_fits() {
        // 1 MB/s link; the app dirtied 2 MB in the 1 s round.
        let r = round(1, MB, 1000, 2 * MB, 0);
        let Next::Round { throttle } = after(&policy(true), &r) else {
            panic!("throttled, not quiesced");
        };
        // Half the app's rate would be 1 MB/s; what a 1 s round may leave
        // within 100 ms at 1 MB/s is 0.1 MB/s, below the floor.
        assert_eq!(throttle, MIN_THROTTLE);
        // Without auto-converge the rounds stop: nothing shrinks.
        assert_eq!(after(&policy(false), &r), Next::Quiesce(Why::NotConverging));
    }

    #[test]
    fn the_throttle_starts_at_half_the_apps_rate_and_halves_while_it_does_not_help() {
        // 100 MB/s link, 1 s rounds: a round may leave 10 MB. The app
        // dirtied 120 MB.
        let r = round(2, 100 * MB, 1000, 120 * MB, 0);
        assert_eq!(
            after(&policy(true), &r),
            Next::Round {
                throttle: 10 * MB // min(60 MB/s, the 10 MB/s goal)
            }
        );
        let r = round(3, 100 * MB, 1000, 120 * MB, 40 * MB);
        assert_eq!(after(&policy(true), &r), Next::Round { throttle: 10 * MB });
        let r = round(3, 100 * MB, 1000, 120 * MB, 12 * MB);
        assert_eq!(after(&policy(true), &r), Next::Round { throttle: 6 * MB });
        // Shrinking under the throttle: keep it.
        let r = round(9, 100 * MB, 1000, 20 * MB, 6 * MB);
        assert_eq!(after(&policy(true), &r), Next::Round { throttle: 6 * MB });
    }

    #[test]
    fn what_the_puller_needs_after_the_final_round_comes_out_of_the_budget() {
        // 10 MB/s; 0.8 MB left: 80 ms of transfer, within 100 ms alone.
        let r = round(2, 10 * MB, 1000, 8 * MB / 10, 0);
        assert_eq!(after(&policy(true), &r), Next::Quiesce(Why::Fits));
        // The puller needs 40 ms to mount, activate and be released.
        let p = Policy {
            overhead: Duration::from_millis(40),
            ..policy(true)
        };
        assert_eq!(after(&p, &r), Next::Round { throttle: 0 });
        // Not shrinking: the throttle lets a round as long leave 60 ms of
        // transfer instead of 100 (10 MB/s link, 1 s rounds).
        let r = round(3, 10 * MB, 1000, 12 * MB, 0);
        assert_eq!(after(&policy(true), &r), Next::Round { throttle: MB });
        assert_eq!(
            after(&p, &r),
            Next::Round {
                throttle: (10.0 * MB as f64 * 0.06) as u64
            }
        );
    }

    #[test]
    fn rounds_end_at_the_limits() {
        // Unthrottled and still shrinking at the last allowed round: with
        // auto-converge the throttle comes in, without it the quiesce.
        let r = round(8, 10 * MB, 1000, 5 * MB, 0);
        assert_eq!(after(&policy(false), &r), Next::Quiesce(Why::OutOfRounds));
        assert!(matches!(
            after(&policy(true), &r),
            Next::Round { throttle } if throttle > 0
        ));
        let r = round(16, 10 * MB, 1000, 5 * MB, MIN_THROTTLE);
        assert_eq!(after(&policy(true), &r), Next::Quiesce(Why::OutOfRounds));
    }

    #[test]
    fn a_round_too_quick_to_time_does_not_divide_by_zero() {
        let r = round(1, 0, 0, 0, 0);
        assert_eq!(after(&policy(true), &r), Next::Quiesce(Why::Fits));
        let r = round(1, 0, 0, MB, 0);
        assert!(matches!(after(&policy(true), &r), Next::Round { .. }));
    }
}
