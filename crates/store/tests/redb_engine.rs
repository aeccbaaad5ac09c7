//! The conformance suite and the model-based test, run against the redb engine.

use amphora_store::redb::{RedbOptions, RedbStore};
use amphora_store::testkit;
use proptest::prelude::*;

fn open(dir: &tempfile::TempDir) -> RedbStore {
    RedbStore::open(&dir.path().join("test.redb"), RedbOptions::default()).expect("open store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_passes_conformance() {
    let dirs = std::sync::Mutex::new(Vec::new());
    testkit::conformance(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        dirs.lock().unwrap().push(dir);
        async move { store }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_keeps_revisions_across_reopen() {
    use amphora_store::{Condition, LeaseChoice, Put, Store};
    let dir = tempfile::tempdir().unwrap();
    let put = |k: &[u8]| Put {
        key: k.to_vec(),
        value: b"v".to_vec(),
        condition: Condition::None,
        lease: LeaseChoice::Keep,
    };
    let s = open(&dir);
    s.put(put(b"a")).await.unwrap();
    s.put(put(b"b")).await.unwrap();
    s.close().await.unwrap();
    drop(s);
    let s = open(&dir);
    assert_eq!(s.revision().await.unwrap(), 2);
    assert_eq!(s.put(put(b"c")).await.unwrap(), 3);
    assert_eq!(s.get(b"a").await.unwrap().unwrap().mod_revision, 1);
    s.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn redb_matches_btreemap_model(ops in testkit::ops()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(testkit::model_based(open(&dir), ops));
    }
}
