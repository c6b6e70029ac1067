//! libFuzzer target: the delta reader and apply, as `volfs::fuzz` runs them.
//!
//! With `VOLFS_FUZZ_SEED_DIR` set, the valid seed deltas are written there
//! before fuzzing starts (pass the same directory as the corpus).
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use volfs::fuzz::DeltaFuzz;

static FUZZ: OnceLock<Mutex<DeltaFuzz>> = OnceLock::new();

fn fuzz() -> &'static Mutex<DeltaFuzz> {
    FUZZ.get_or_init(|| Mutex::new(DeltaFuzz::new().expect("scratch directory")))
}

fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("VOLFS_FUZZ_SEED_DIR") {
            let seeds = fuzz().lock().unwrap().seeds().expect("seed deltas");
            std::fs::create_dir_all(&dir).expect("seed directory");
            for (i, s) in seeds.iter().enumerate() {
                std::fs::write(std::path::Path::new(&dir).join(format!("seed-{i}")), s)
                    .expect("seed file");
            }
        }
    },
    |data: &[u8]| {
        fuzz().lock().unwrap_or_else(|p| p.into_inner()).run(data);
    }
);
