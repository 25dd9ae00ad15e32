//! Measuring audio the way a test bench would: a pure tone to feed in, and the level of one
//! frequency in what comes out (the Goertzel algorithm). Used to check that resampling keeps a
//! tone's level and leaves no images, without comparing against the resampler's own output.

/// `samples` of a sine at `freq` Hz and `amplitude` (of full scale), sampled at `rate`.
pub fn tone(rate: u32, freq: f64, amplitude: f64, samples: usize) -> Vec<i16> {
    (0..samples)
        .map(|n| {
            let t = n as f64 / f64::from(rate);
            (amplitude * 32767.0 * (2.0 * std::f64::consts::PI * freq * t).sin()) as i16
        })
        .collect()
}

/// The amplitude of `freq` in `samples` (sampled at `rate`), relative to full scale.
pub fn level(samples: &[i16], rate: u32, freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s = f64::from(x) / 32768.0 + 2.0 * w.cos() * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
    2.0 * power.sqrt() / samples.len().max(1) as f64
}

/// A ratio in decibels.
pub fn db(ratio: f64) -> f64 {
    20.0 * ratio.log10()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tone_measures_at_its_own_frequency_and_not_elsewhere() {
        let t = tone(8000, 1000.0, 0.5, 8000);
        assert!((level(&t, 8000, 1000.0) - 0.5).abs() < 0.01);
        assert!(db(level(&t, 8000, 2500.0) / 0.5) < -40.0);
    }
}
