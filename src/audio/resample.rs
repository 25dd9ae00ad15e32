//! Streaming sample-rate conversion between Twilio's 8 kHz and what a `pcm16` backend wants
//! (16 or 24 kHz), through rubato's band-limited FFT resampler. One `Resampler` per link and
//! direction keeps the filter state across frames, so frame edges do not click; input of any
//! length is buffered into the resampler's fixed chunks.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler as _};

/// Why a resampler could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot resample {from} Hz to {to} Hz: {reason}")]
pub struct ResampleError {
    from: u32,
    to: u32,
    reason: String,
}

/// One direction of one link's audio: 16-bit samples in at `from` Hz, out at `to` Hz.
pub struct Resampler {
    /// `None` when the rates are equal: samples pass through untouched.
    fft: Option<Fft<f32>>,
    /// Input waiting for a whole chunk.
    pending: Vec<f32>,
    scratch: Vec<f32>,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("resampling", &self.fft.is_some())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Resampler {
    /// A resampler that takes 20 ms of input at a time (it buffers whatever it is given).
    pub fn new(from: u32, to: u32) -> Result<Resampler, ResampleError> {
        let fail = |reason: String| ResampleError { from, to, reason };
        if from == 0 || to == 0 {
            return Err(fail("rates must be above zero".into()));
        }
        let fft = if from == to {
            None
        } else {
            let chunk = (from / 50) as usize;
            Some(
                Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input)
                    .map_err(|e| fail(e.to_string()))?,
            )
        };
        Ok(Resampler {
            fft,
            pending: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Feeds `samples` and appends what comes out to `out`. Output lags input by the
    /// resampler's fixed delay (a few milliseconds); nothing is lost, nothing repeated.
    pub fn push(&mut self, samples: &[i16], out: &mut Vec<i16>) {
        let Some(fft) = &mut self.fft else {
            out.extend_from_slice(samples);
            return;
        };
        self.pending
            .extend(samples.iter().map(|&s| f32::from(s) / 32768.0));
        let mut used = 0;
        loop {
            let need = fft.input_frames_next();
            if self.pending.len() - used < need {
                break;
            }
            self.scratch.resize(fft.output_frames_max(), 0.0);
            let input = &self.pending[used..used + need];
            let (Ok(input), Ok(mut output)) = (
                InterleavedSlice::new(input, 1, need),
                InterleavedSlice::new_mut(&mut self.scratch, 1, fft.output_frames_max()),
            ) else {
                break;
            };
            match fft.process_into_buffer(&input, &mut output, None) {
                Ok((consumed, written)) => {
                    used += consumed;
                    out.extend(self.scratch[..written].iter().map(|&v| to_i16(v)));
                }
                Err(_) => break,
            }
        }
        self.pending.drain(..used);
    }
}

fn to_i16(v: f32) -> i16 {
    (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::measure::{db, level, tone};

    /// Pushed in the odd sizes a backend might send, after the filter has settled.
    fn resample(from: u32, to: u32, input: &[i16]) -> Vec<i16> {
        let mut r = Resampler::new(from, to).unwrap();
        let mut out = Vec::new();
        for piece in input.chunks(97) {
            r.push(piece, &mut out);
        }
        out
    }

    #[test]
    fn up_from_8_khz_keeps_the_tone_and_leaves_no_images() {
        for to in [16_000, 24_000] {
            let input = tone(8000, 1000.0, 0.5, 8000);
            let out = resample(8000, to, &input);
            let expected = input.len() * to as usize / 8000;
            assert!(
                out.len() + to as usize / 50 * 3 >= expected,
                "{to}: {} of {expected} samples",
                out.len()
            );
            let settled = &out[out.len() / 4..out.len() * 3 / 4];
            let wanted = level(settled, to, 1000.0);
            assert!(
                (db(wanted / 0.5)).abs() < 0.5,
                "{to}: level {:.2} dB",
                db(wanted / 0.5)
            );
            // Sample repetition or linear interpolation would leave images of 1 kHz around
            // multiples of 8 kHz.
            for image in [7000.0, 9000.0] {
                if image < f64::from(to) / 2.0 {
                    let got = level(settled, to, image);
                    assert!(
                        db(got / wanted) < -40.0,
                        "{to}: image at {image} Hz only {:.1} dB down",
                        db(got / wanted)
                    );
                }
            }
        }
    }

    #[test]
    fn down_to_8_khz_keeps_the_tone_and_does_not_fold_what_it_cannot_carry() {
        for from in [16_000, 24_000] {
            let input = tone(from, 1000.0, 0.5, from as usize);
            let out = resample(from, 8000, &input);
            let settled = &out[out.len() / 4..out.len() * 3 / 4];
            let wanted = level(settled, 8000, 1000.0);
            assert!(
                (db(wanted / 0.5)).abs() < 0.5,
                "{from}: level {:.2} dB",
                db(wanted / 0.5)
            );
            // 6 kHz is above 8 kHz's Nyquist frequency: it must be filtered out, not folded
            // down to 2 kHz.
            let high = tone(from, 6000.0, 0.5, from as usize);
            let out = resample(from, 8000, &high);
            let settled = &out[out.len() / 4..out.len() * 3 / 4];
            let folded = level(settled, 8000, 2000.0);
            assert!(
                db(folded / 0.5) < -40.0,
                "{from}: 6 kHz folded to {:.1} dB",
                db(folded / 0.5)
            );
        }
    }

    #[test]
    fn equal_rates_pass_samples_through() {
        let input = tone(8000, 440.0, 0.3, 800);
        assert_eq!(resample(8000, 8000, &input), input);
    }
}
