//! Integration tests of dhrt-storage: one test binary, a module per concern.

mod api;
mod checksum;
mod compaction;
mod crash;
mod digest;
mod model;
mod names;
mod recovery;
mod release;
mod watch;

use dhrt_storage::{Options, Store, SyncMode};

/// Options for tests: no background thread surprises.
pub(crate) fn quiet_options() -> Options {
    Options {
        sync: SyncMode::Never,
        background_compaction: false,
        min_index_shards: 1,
        keys_per_shard: 4,
        ..Options::default()
    }
}

/// Opens a persisted and a memory store, so each API test runs on both.
pub(crate) fn both_modes(dir: &std::path::Path, options: Options) -> Vec<Store> {
    vec![
        Store::open(dir, options.clone()).unwrap(),
        Store::memory(options),
    ]
}
