#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tower_qwen_fuzz::gateway_router(data));
