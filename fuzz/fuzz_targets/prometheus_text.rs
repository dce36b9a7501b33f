#![no_main]
//! `/metrics` text from engines.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = switchyard::engines::stats::parse_vllm_metrics(text);
    }
});
