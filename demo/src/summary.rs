//! The demo's verdict: the phase table (every request in the phase it
//! started in) and the checks of the story, in its order.

use std::time::Duration;

use lb_tests::servers::backend_name;

use crate::{
    BACKENDS, MIN_REQUESTS, MIN_SHARE_ALL_UP, MIN_SHARE_FAILOVER, MIN_SHARE_REJOINED, PHASES,
    Sample, Timeline, Transitions, VICTIM,
};

pub struct Check {
    pub ok: bool,
    pub what: String,
}

impl Check {
    pub fn new(ok: bool, what: impl Into<String>) -> Self {
        Self {
            ok,
            what: what.into(),
        }
    }
}

#[derive(Default, Clone)]
struct Tally {
    per: [usize; BACKENDS],
    failed: usize,
    first_error: Option<String>,
}

impl Tally {
    fn total(&self) -> usize {
        self.per.iter().sum::<usize>() + self.failed
    }

    fn served(&self) -> usize {
        self.per.iter().sum()
    }

    /// Share of the answered requests backend `i` answered, in %.
    fn share(&self, i: usize) -> f64 {
        if self.served() == 0 {
            0.0
        } else {
            100.0 * self.per[i] as f64 / self.served() as f64
        }
    }

    fn shares(&self, which: impl Iterator<Item = usize>) -> String {
        which
            .map(|i| format!("{:.0} %", self.share(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Prints the phase table and returns every check, in the order of the
/// story.
pub fn summary(samples: &[Sample], tl: &Timeline, end: Duration, tr: Transitions) -> Vec<Check> {
    let mut tallies = vec![Tally::default(); PHASES.len()];
    for s in samples {
        let t = &mut tallies[tl.phase_of(s)];
        match &s.outcome {
            Ok(i) => t.per[*i] += 1,
            Err(e) => {
                t.failed += 1;
                t.first_error
                    .get_or_insert_with(|| format!("at {:.2} s: {e}", s.end.as_secs_f64()));
            }
        }
    }

    println!();
    println!(
        "phases (a request counts in the phase it started in; \"all up\": finished before the kill):"
    );
    let mut h = format!("  {:<20} {:>11} {:>8}", "phase", "from-to (s)", "requests");
    for i in 0..BACKENDS {
        h.push_str(&format!("  {:>13}", backend_name(i)));
    }
    h.push_str(&format!("  {:>6}", "failed"));
    println!("{h}");
    let fmt_t =
        |t: Option<Duration>| t.map_or("?".to_string(), |t| format!("{:.1}", t.as_secs_f64()));
    for (p, ((from, to), t)) in tl.bounds(end).iter().zip(&tallies).enumerate() {
        let mut r = format!(
            "  {:<20} {:>11} {:>8}",
            PHASES[p],
            format!("{}-{}", fmt_t(*from), fmt_t(*to)),
            t.total()
        );
        for i in 0..BACKENDS {
            r.push_str(&format!("  {:>6} {:>4.0} %", t.per[i], t.share(i)));
        }
        r.push_str(&format!("  {:>6}", t.failed));
        println!("{r}");
    }
    if let Some(e) = &tallies[1].first_error {
        println!(
            "  (failures until lb noticed the kill are expected: its ring still sent new flows there; first {e})"
        );
    }

    let victim = backend_name(VICTIM);
    let others: Vec<usize> = (0..BACKENDS).filter(|&i| i != VICTIM).collect();
    let [all_up, _stopped, failover, restarted, rejoined] = &tallies[..] else {
        unreachable!()
    };
    let mut checks = Vec::new();
    let no_failure = |phase: &str, t: &Tally| {
        Check::new(
            t.failed == 0 && t.total() >= MIN_REQUESTS,
            format!(
                "{phase}: no request failed ({} of {}){}",
                t.failed,
                t.total(),
                t.first_error
                    .as_ref()
                    .map(|e| format!(", first {e}"))
                    .unwrap_or_default()
            ),
        )
    };
    checks.push(no_failure("all up", all_up));
    checks.push(Check::new(
        all_up.served() >= MIN_REQUESTS
            && (0..BACKENDS).all(|i| all_up.share(i) >= MIN_SHARE_ALL_UP),
        format!(
            "all up: every backend answered >= {MIN_SHARE_ALL_UP:.0} % ({})",
            all_up.shares(0..BACKENDS)
        ),
    ));
    let missing = |what: &str| Check::new(false, format!("{what}: did not happen"));
    checks.push(
        tr.down
            .unwrap_or_else(|| missing(&format!("lb marks {victim} down"))),
    );
    checks.push(no_failure("failover", failover));
    checks.push(Check::new(
        failover.served() >= MIN_REQUESTS && failover.per[VICTIM] == 0,
        format!(
            "failover: {victim} answered nothing ({} of {})",
            failover.per[VICTIM],
            failover.served()
        ),
    ));
    checks.push(Check::new(
        failover.served() >= MIN_REQUESTS
            && others
                .iter()
                .all(|&i| failover.share(i) >= MIN_SHARE_FAILOVER),
        format!(
            "failover: the others each took >= {MIN_SHARE_FAILOVER:.0} % ({})",
            failover.shares(others.iter().copied())
        ),
    ));
    checks.push(
        tr.forwarded
            .unwrap_or_else(|| missing(&format!("failover: counting lb's packets to {victim}"))),
    );
    checks.push(
        tr.up
            .unwrap_or_else(|| missing(&format!("lb marks {victim} up"))),
    );
    let mut after = restarted.clone();
    for i in 0..BACKENDS {
        after.per[i] += rejoined.per[i];
    }
    after.failed += rejoined.failed;
    after.first_error = after.first_error.or(rejoined.first_error.clone());
    checks.push(no_failure("restart and rejoin", &after));
    checks.push(Check::new(
        rejoined.served() >= MIN_REQUESTS && rejoined.share(VICTIM) >= MIN_SHARE_REJOINED,
        format!(
            "rejoined: {victim} answered >= {MIN_SHARE_REJOINED:.0} % again ({})",
            rejoined.shares(0..BACKENDS)
        ),
    ));
    checks.push(
        tr.held
            .unwrap_or_else(|| missing("established flows survive the rejoin")),
    );
    checks
}
