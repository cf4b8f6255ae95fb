//! Summaries of repeated measurements: median, min, max and nearest-rank percentiles.
//!
//! Owns the arithmetic only; what a sample means (milliseconds, transactions per second) is
//! the caller's business.

/// The samples of one metric for one target.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub samples: Vec<f64>,
}

impl Summary {
    pub fn of(samples: Vec<f64>) -> Option<Summary> {
        if samples.is_empty() {
            None
        } else {
            Some(Summary { samples })
        }
    }

    pub fn one(v: f64) -> Summary {
        Summary { samples: vec![v] }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    /// The median (mean of the two middle samples for an even count).
    pub fn median(&self) -> f64 {
        let s = self.sorted();
        let n = s.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// Nearest-rank percentile, `q` in 0..=100.
    pub fn percentile(&self, q: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        let rank = ((q / 100.0) * s.len() as f64).ceil() as usize;
        s[rank.clamp(1, s.len()) - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn median_min_max_percentiles() {
        let s = Summary::of(vec![5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.median(), s.min(), s.max()), (3.0, 1.0, 5.0));
        assert_eq!(Summary::of(vec![1.0, 2.0, 3.0, 4.0]).unwrap().median(), 2.5);
        let h = Summary::of((1..=100).map(f64::from).collect()).unwrap();
        assert_eq!(
            (h.percentile(50.0), h.percentile(99.0), h.percentile(100.0)),
            (50.0, 99.0, 100.0)
        );
        assert!(Summary::of(vec![]).is_none());
    }
}
