//! Runtime-adjustable failure injection.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Failure injection of one simulated engine, adjustable while it runs.
///
/// Applies to the inference endpoints only (`/v1/completions`, `/v1/chat/completions`);
/// `/health`, `/metrics` and `/v1/models` keep answering. For each request, in this order:
/// `hang` → the request is read and never answered (until shutdown); else with probability
/// `drop_rate` the connection is closed without a response; else with probability `fail_rate`
/// the answer is HTTP 500 with an OpenAI-shaped JSON error. Draws come from one RNG seeded
/// with the engine's seed.
#[derive(Debug)]
pub struct Faults {
    fail_rate: AtomicU64,
    drop_rate: AtomicU64,
    hang: AtomicBool,
    rng: Mutex<fastrand::Rng>,
}

/// What failure injection decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    None,
    Hang,
    Drop,
    Fail,
}

fn clamp_rate(r: f64) -> f64 {
    if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) }
}

impl Faults {
    pub(crate) fn new(fail_rate: f64, drop_rate: f64, hang: bool, seed: u64) -> Faults {
        Faults {
            fail_rate: AtomicU64::new(clamp_rate(fail_rate).to_bits()),
            drop_rate: AtomicU64::new(clamp_rate(drop_rate).to_bits()),
            hang: AtomicBool::new(hang),
            // A different stream from the one that picks output words.
            rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0x6661_756c_7473)),
        }
    }

    /// Sets the fraction of requests answered 500 (clamped to [0, 1]).
    pub fn set_fail_rate(&self, rate: f64) {
        self.fail_rate
            .store(clamp_rate(rate).to_bits(), Ordering::Relaxed);
    }

    /// Sets the fraction of requests whose connection is dropped (clamped to [0, 1]).
    pub fn set_drop_rate(&self, rate: f64) {
        self.drop_rate
            .store(clamp_rate(rate).to_bits(), Ordering::Relaxed);
    }

    /// Makes the engine accept requests but never answer them (or answer again).
    pub fn set_hang(&self, hang: bool) {
        self.hang.store(hang, Ordering::Relaxed);
    }

    pub fn fail_rate(&self) -> f64 {
        f64::from_bits(self.fail_rate.load(Ordering::Relaxed))
    }

    pub fn drop_rate(&self) -> f64 {
        f64::from_bits(self.drop_rate.load(Ordering::Relaxed))
    }

    pub fn hang(&self) -> bool {
        self.hang.load(Ordering::Relaxed)
    }

    /// Decides the fate of one request. Draws nothing (takes no lock) when no rate is set.
    pub(crate) fn draw(&self) -> Fault {
        if self.hang() {
            return Fault::Hang;
        }
        let (drop, fail) = (self.drop_rate(), self.fail_rate());
        if drop <= 0.0 && fail <= 0.0 {
            return Fault::None;
        }
        let mut rng = match self.rng.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if drop > 0.0 && rng.f64() < drop {
            Fault::Drop
        } else if fail > 0.0 && rng.f64() < fail {
            Fault::Fail
        } else {
            Fault::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_clamped_and_extremes_are_certain() {
        let f = Faults::new(2.0, f64::NAN, false, 1);
        assert_eq!(f.fail_rate(), 1.0);
        assert_eq!(f.drop_rate(), 0.0);
        assert!((0..100).all(|_| f.draw() == Fault::Fail));
        f.set_drop_rate(1.0);
        assert!((0..100).all(|_| f.draw() == Fault::Drop));
        f.set_hang(true);
        assert_eq!(f.draw(), Fault::Hang);
        f.set_hang(false);
        f.set_drop_rate(0.0);
        f.set_fail_rate(-1.0);
        assert!((0..100).all(|_| f.draw() == Fault::None));
    }

    #[test]
    fn fractional_rate_is_roughly_honoured_and_seeded() {
        let draws = |seed| {
            let f = Faults::new(0.3, 0.0, false, seed);
            (0..2000).map(|_| f.draw()).collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7), "same seed, same draws");
        let fails = a.iter().filter(|&&x| x == Fault::Fail).count();
        assert!((450..750).contains(&fails), "{fails} of 2000 at 0.3");
    }
}
