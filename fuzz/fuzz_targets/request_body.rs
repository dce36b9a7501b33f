#![no_main]
//! Request bodies as the router parses them for routing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = switchyard::request::parse_body(data, Some("user")) {
        // Whatever parses hashes and counts without trouble.
        let _ = switchyard::tokens::block_hashes(p.prompt.as_bytes(), 16);
        let _ = switchyard::tokens::estimate_tokens(p.prompt.len());
    }
});
