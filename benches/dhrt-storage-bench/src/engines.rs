//! The engines under test behind one small trait, each at the durability the
//! comparison states: dhrt `Interval(1 s)` (default), fjall's default journal
//! (flushed to the OS per write, fsynced in the background), redb committing
//! (fsync) once per 1,000 writes, sled's default (flush every 500 ms).

use std::path::Path;

type Pair = ([u8; 16], [u8; 100]);

/// One engine.
pub(crate) trait Engine: Sync {
    /// Writes a batch (redb: one transaction; the others: one write each).
    fn set_batch(&self, batch: &[Pair]);
    /// Writes one key; `n` counts this thread's writes, for engines that
    /// make every 1,000th write durable.
    fn set_one(&self, key: &[u8], value: &[u8], n: u64);
    /// Reads a key; returns its first byte so the read cannot be skipped.
    fn get(&self, key: &[u8]) -> Option<u8>;
    /// Flushes before close.
    fn close(&self);
}

pub(crate) fn open_engine(name: &str, dir: &Path) -> Box<dyn Engine> {
    match name {
        "dhrt" => {
            let mut options = dhrt_storage::Options::default();
            if let Ok(per) = std::env::var("DHRT_BENCH_KEYS_PER_SHARD") {
                options.keys_per_shard = per.parse().unwrap();
            }
            Box::new(Dhrt(dhrt_storage::Store::open(dir, options).unwrap()))
        }
        "redb" => Box::new(Redb(redb::Database::create(dir.join("db.redb")).unwrap())),
        "fjall" => {
            let db = fjall::Database::builder(dir).open().unwrap();
            let ks = db
                .keyspace("bench", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            Box::new(Fjall(db, ks))
        }
        "sled" => Box::new(Sled(sled::open(dir).unwrap())),
        other => panic!("unknown engine {other}"),
    }
}

struct Dhrt(dhrt_storage::Store);

impl Engine for Dhrt {
    fn set_batch(&self, batch: &[Pair]) {
        for (k, v) in batch {
            self.0.set("bench", k, v).unwrap();
        }
    }
    fn set_one(&self, key: &[u8], value: &[u8], _: u64) {
        self.0.set("bench", key, value).unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<u8> {
        self.0.get("bench", key).unwrap().map(|v| v[0])
    }
    fn close(&self) {
        self.0.sync().unwrap();
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("bench");

struct Redb(redb::Database);

impl Engine for Redb {
    fn set_batch(&self, batch: &[Pair]) {
        let tx = self.0.begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (k, v) in batch {
                t.insert(&k[..], &v[..]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    fn set_one(&self, key: &[u8], value: &[u8], n: u64) {
        let mut tx = self.0.begin_write().unwrap();
        if n % 1000 != 999 {
            tx.set_durability(redb::Durability::None).unwrap();
        }
        {
            let mut t = tx.open_table(TABLE).unwrap();
            t.insert(key, value).unwrap();
        }
        tx.commit().unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<u8> {
        use redb::ReadableDatabase;
        let tx = self.0.begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        t.get(key).unwrap().map(|v| v.value()[0])
    }
    fn close(&self) {
        let mut tx = self.0.begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate).unwrap();
        tx.commit().unwrap();
    }
}

struct Fjall(fjall::Database, fjall::Keyspace);

impl Engine for Fjall {
    fn set_batch(&self, batch: &[Pair]) {
        for (k, v) in batch {
            self.1.insert(k, v).unwrap();
        }
    }
    fn set_one(&self, key: &[u8], value: &[u8], _: u64) {
        self.1.insert(key, value).unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<u8> {
        self.1.get(key).unwrap().map(|v| v[0])
    }
    fn close(&self) {
        self.0.persist(fjall::PersistMode::SyncAll).unwrap();
    }
}

struct Sled(sled::Db);

impl Engine for Sled {
    fn set_batch(&self, batch: &[Pair]) {
        for (k, v) in batch {
            self.0.insert(k, &v[..]).unwrap();
        }
    }
    fn set_one(&self, key: &[u8], value: &[u8], _: u64) {
        self.0.insert(key, value).unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<u8> {
        self.0.get(key).unwrap().map(|v| v[0])
    }
    fn close(&self) {
        self.0.flush().unwrap();
    }
}
