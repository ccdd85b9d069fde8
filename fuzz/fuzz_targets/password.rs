#![no_main]
// The body lives in ../targets.rs, shared with tests/it/fuzz_replay.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tollgate_fuzz::password(data);
});
