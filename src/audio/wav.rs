//! Reads the WAV files the tools play: 8-bit mu-law (format 7) or 16-bit PCM (format 1), plain
//! or WAVE_FORMAT_EXTENSIBLE. `hound` writes our recordings but cannot read mu-law, hence this.

use super::mulaw;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    MuLaw,
    Pcm16,
}

#[derive(Debug, Clone)]
pub struct Wav {
    pub encoding: Encoding,
    pub sample_rate: u32,
    pub channels: u16,
    /// The `data` chunk, header stripped.
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WavError {
    #[error("not a WAV file (no RIFF/WAVE header)")]
    NotWav,
    #[error("WAV file has no `{0}` chunk")]
    Missing(&'static str),
    #[error("WAV chunk `{0}` runs past the end of the file")]
    Truncated(String),
    #[error(
        "unsupported WAV encoding (format tag {tag}, {bits} bits): use 8-bit mu-law or 16-bit PCM"
    )]
    Unsupported { tag: u16, bits: u16 },
    #[error("audio is {rate} Hz, {channels} channel(s): Twilio audio is 8000 Hz mono (convert with `sox in.wav -r 8000 -c 1 -e mu-law out.wav`)")]
    NotTwilioAudio { rate: u32, channels: u16 },
}

const FORMAT_PCM: u16 = 1;
const FORMAT_MULAW: u16 = 7;
const FORMAT_EXTENSIBLE: u16 = 0xfffe;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub fn read(bytes: &[u8]) -> Result<Wav, WavError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(WavError::NotWav);
    }
    let mut format: Option<(u16, u16, u32, u16)> = None;
    let mut data = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let len = u32_at(bytes, at + 4) as usize;
        let body = at + 8;
        let name = String::from_utf8_lossy(id).into_owned();
        let end = body.checked_add(len).filter(|e| *e <= bytes.len());
        match id {
            b"fmt " => {
                let end = end.ok_or(WavError::Truncated(name))?;
                if len < 16 {
                    return Err(WavError::Missing("fmt "));
                }
                let chunk = &bytes[body..end];
                let mut tag = u16_at(chunk, 0);
                let channels = u16_at(chunk, 2);
                let rate = u32_at(chunk, 4);
                let bits = u16_at(chunk, 14);
                if tag == FORMAT_EXTENSIBLE && chunk.len() >= 26 {
                    // The sub-format GUID starts with the plain format tag.
                    tag = u16_at(chunk, 24);
                }
                format = Some((tag, channels, rate, bits));
            }
            b"data" => {
                // Streaming writers leave the length at 0 or 0xFFFFFFFF: take the rest.
                let end = end.unwrap_or(bytes.len());
                data = Some(bytes[body..end].to_vec());
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        at = body.saturating_add(len).saturating_add(len & 1);
    }
    let (tag, channels, sample_rate, bits) = format.ok_or(WavError::Missing("fmt "))?;
    let data = data.ok_or(WavError::Missing("data"))?;
    let encoding = match (tag, bits) {
        (FORMAT_MULAW, 8) => Encoding::MuLaw,
        (FORMAT_PCM, 16) => Encoding::Pcm16,
        (tag, bits) => return Err(WavError::Unsupported { tag, bits }),
    };
    Ok(Wav {
        encoding,
        sample_rate,
        channels,
        data,
    })
}

/// A WAV file of Twilio audio: 8 kHz mono mu-law, as the original service's test client sent
/// whole in one media payload (and as tests build one).
pub fn mulaw_file(audio: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(44 + audio.len());
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + audio.len() as u32).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&FORMAT_MULAW.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&super::SAMPLE_RATE.to_le_bytes());
    b.extend_from_slice(&super::SAMPLE_RATE.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&8u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(audio.len() as u32).to_le_bytes());
    b.extend_from_slice(audio);
    b
}

impl Wav {
    /// The audio as Twilio carries it: mu-law bytes, 8 kHz mono.
    pub fn to_twilio_mulaw(&self) -> Result<Vec<u8>, WavError> {
        if self.sample_rate != super::SAMPLE_RATE || self.channels != 1 {
            return Err(WavError::NotTwilioAudio {
                rate: self.sample_rate,
                channels: self.channels,
            });
        }
        Ok(match self.encoding {
            Encoding::MuLaw => self.data.clone(),
            Encoding::Pcm16 => self
                .data
                .chunks_exact(2)
                .map(|s| mulaw::encode(i16::from_le_bytes([s[0], s[1]])))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(tag: u16, bits: u16, rate: u32, channels: u16, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(b"WAVE");
        b.extend_from_slice(b"fmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        let align = channels * bits / 8;
        b.extend_from_slice(&(rate * align as u32).to_le_bytes());
        b.extend_from_slice(&align.to_le_bytes());
        b.extend_from_slice(&bits.to_le_bytes());
        b.extend_from_slice(b"LIST");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(b"abc\0");
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn a_mulaw_file_reads_back_as_its_audio() {
        let audio = [1u8, 2, 3, 250];
        let w = read(&mulaw_file(&audio)).unwrap();
        assert_eq!(w.to_twilio_mulaw().unwrap(), audio);
    }

    #[test]
    fn reads_mulaw_and_skips_other_chunks() {
        let w = read(&wav(7, 8, 8000, 1, &[1, 2, 3])).unwrap();
        assert_eq!(w.encoding, Encoding::MuLaw);
        assert_eq!(w.to_twilio_mulaw().unwrap(), [1, 2, 3]);
    }

    #[test]
    fn encodes_pcm16_to_mulaw() {
        let samples: Vec<u8> = [0i16, i16::MAX, i16::MIN]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let w = read(&wav(1, 16, 8000, 1, &samples)).unwrap();
        assert_eq!(w.to_twilio_mulaw().unwrap(), [0xff, 0x80, 0x00]);
    }

    #[test]
    fn refuses_what_it_cannot_play() {
        assert_eq!(read(b"ID3 not a wav").unwrap_err(), WavError::NotWav);
        assert!(matches!(
            read(&wav(3, 32, 8000, 1, &[0; 8])).unwrap_err(),
            WavError::Unsupported { tag: 3, bits: 32 }
        ));
        let stereo = read(&wav(7, 8, 44100, 2, &[0; 4])).unwrap();
        assert!(stereo
            .to_twilio_mulaw()
            .unwrap_err()
            .to_string()
            .contains("8000 Hz mono"));
        let mut cut = wav(7, 8, 8000, 1, &[0; 4]);
        cut.truncate(20);
        assert!(read(&cut).is_err());
    }

    #[test]
    fn reads_the_shipped_samples() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("audio-samples");
        for name in ["hello-en-us.wav", "message-en-gb.wav", "testing-123.wav"] {
            let w = read(&std::fs::read(dir.join(name)).unwrap()).unwrap();
            let audio = w.to_twilio_mulaw().unwrap();
            assert!(audio.len() > 8000, "{name}: at least a second of audio");
        }
    }
}
