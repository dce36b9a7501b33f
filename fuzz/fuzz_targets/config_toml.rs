#![no_main]
//! The config file.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = toml::from_str::<switchyard::config::FileConfig>(text);
    }
});
