#![no_main]
//! Request bodies as the router parses them for routing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = switchyard::request::parse_body(data, Some("user"), 16) {
        // Whatever parses is digested consistently: one hash per full block of its bytes.
        assert_eq!(p.prompt.block_hashes.len(), p.prompt.bytes / 64);
        assert!(p.prompt.chars <= p.prompt.bytes);
    }
});
