//! Fuzzes frame decoding: arbitrary bytes must yield a typed error or a message that
//! re-encodes to a frame decoding to the same message. Never a panic, never an abort.
#![no_main]

use chorus_core::Envelope;
use chorus_core::wire;
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // The stream path: how much a transport would buffer for this prefix.
    if let Ok(Some(len)) = wire::frame_len(data, MAX) {
        assert!(len <= MAX);
    }
    if let Ok((header, message)) = wire::decode::<Envelope>(data, MAX) {
        let again = wire::encode(header, &message, MAX).expect("a decoded message re-encodes");
        let (header2, message2) = wire::decode::<Envelope>(&again, MAX).expect("re-encoded frame decodes");
        assert_eq!(header, header2);
        assert_eq!(message, message2);
    }
});
