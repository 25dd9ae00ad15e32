//! G.711 mu-law: 8-bit companded samples to and from 16-bit linear PCM.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32635;

/// Every code's linear value, computed once at compile time.
static DECODE: [i16; 256] = {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        let u = !(i as u8);
        let exponent = ((u >> 4) & 0x07) as i32;
        let mantissa = (u & 0x0f) as i32;
        let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
        table[i] = if u & 0x80 != 0 {
            -magnitude as i16
        } else {
            magnitude as i16
        };
        i += 1;
    }
    table
};

pub fn decode(code: u8) -> i16 {
    DECODE[code as usize]
}

pub fn encode(sample: i16) -> u8 {
    let mut pcm = sample as i32;
    let sign = if pcm < 0 {
        pcm = -pcm;
        0x80
    } else {
        0
    };
    pcm = pcm.min(CLIP) + BIAS;
    // The segment is the position of the highest set bit above bit 7.
    let exponent = (31 - (pcm as u32).leading_zeros()) as i32 - 7;
    let mantissa = (pcm >> (exponent + 3)) & 0x0f;
    !((sign | (exponent << 4) | mantissa) as u8)
}

/// Decodes a buffer of mu-law bytes to linear samples.
pub fn decode_all(codes: &[u8]) -> Vec<i16> {
    codes.iter().map(|&c| decode(c)).collect()
}

pub fn encode_all(samples: &[i16]) -> Vec<u8> {
    samples.iter().map(|&s| encode(s)).collect()
}

/// The mu-law code for silence.
pub const SILENCE: u8 = 0xff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            let back = encode(decode(code));
            // 0x7f is "negative zero": it decodes to 0, which encodes as 0xff.
            let expected = if code == 0x7f { 0xff } else { code };
            assert_eq!(back, expected, "code {code:#04x}");
        }
    }

    #[test]
    fn agrees_with_the_g711_reference_table() {
        // Values of the reference ulaw2linear table (ITU-T G.711, Sun's g711.c).
        for (code, linear) in [
            (0x00u8, -32124i16),
            (0x01, -31100),
            (0x0f, -16764),
            (0x10, -15996),
            (0x7e, -8),
            (0x7f, 0),
            (0x80, 32124),
            (0x90, 15996),
            (0xfe, 8),
            (0xff, 0),
        ] {
            assert_eq!(decode(code), linear, "decode {code:#04x}");
        }
        for (linear, code) in [
            (0i16, 0xffu8),
            (-1, 0x7f),
            (i16::MAX, 0x80),
            (i16::MIN, 0x00),
            (8, 0xfe),
            (-8, 0x7e),
        ] {
            assert_eq!(encode(linear), code, "encode {linear}");
        }
    }

    #[test]
    fn encoding_is_monotonic() {
        // Louder never maps to a code that decodes quieter.
        let mut last = i16::MIN;
        for s in (i16::MIN..=i16::MAX).step_by(7) {
            let d = decode(encode(s));
            assert!(d >= last, "{s} -> {d} after {last}");
            last = d;
        }
    }
}
