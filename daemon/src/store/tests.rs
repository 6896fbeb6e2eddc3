use super::*;
use crate::event::now_ms;

fn event(id: &str, body: &str) -> Event {
    Event {
        id: id.into(),
        source: "clockify".into(),
        event_type: "NEW_TIME_ENTRY".into(),
        received_at_ms: now_ms(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body.to_owned()),
        dedup_key: format!("k-{id}"),
    }
}

#[tokio::test]
async fn events_survive_reopen_and_gauges_follow_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.insert(event("a", "{\"n\":1}"), vec!["s1".into(), "s2".into()]).await.unwrap();
    let b = store.insert(event("b", "{\"n\":2}"), vec!["s1".into()]).await.unwrap();
    store.insert(event("c", "{}"), vec![]).await.unwrap();
    assert!(a < b);
    assert_eq!(store.gauges().snapshot(), (2, 14, 3));
    store.close().await;

    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.gauges().snapshot(), (2, 14, 3));
    let pending = store.pending("s1", 0, 10).await.unwrap();
    assert_eq!(pending.iter().map(|p| p.event.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(pending[0].event.body, Bytes::from_static(b"{\"n\":1}"));
    assert_eq!(store.pending("s1", a, 10).await.unwrap().len(), 1);

    store.record(a, "s1", 1, Outcome::Retry { next_attempt_ms: now_ms(), error: "503".into() }).await.unwrap();
    assert_eq!(store.pending("s1", 0, 10).await.unwrap()[0].attempts, 1);
    store.record(a, "s1", 2, Outcome::Delivered).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (2, 14, 2));
    store.record(a, "s2", 1, Outcome::Dead("410 Gone".into())).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 1));
    // Recording twice changes nothing.
    store.record(a, "s2", 1, Outcome::Delivered).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 1));
    let d = store.deliveries_of("a").await.unwrap();
    assert_eq!(
        d,
        [
            ("s1".into(), "delivered".into(), 2, Some("503".into())),
            ("s2".into(), "dead".into(), 1, Some("410 Gone".into()))
        ]
    );

    // Prune removes finished events only.
    assert_eq!(store.prune(now_ms() + 1).await.unwrap(), 2);
    assert!(!store.has_event("a").await.unwrap());
    assert!(store.has_event("b").await.unwrap());
    store.close().await;
}

#[tokio::test]
async fn handshakes_are_kept_bounded_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for i in 0..(crate::limits::HANDSHAKES_KEPT + 5) {
        store.record_handshake("clockodo", &format!("secret-{i}"), i).await.unwrap();
    }
    store.ping().await.unwrap();
    let list = list_handshakes(dir.path()).unwrap();
    assert_eq!(list.len() as i64, crate::limits::HANDSHAKES_KEPT);
    assert_eq!(list[0].secret, format!("secret-{}", crate::limits::HANDSHAKES_KEPT + 4));
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Closed)));
}
