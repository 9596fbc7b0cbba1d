use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn hold_confirm_and_see_it_live() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(5, 5, &[]).await;
    let mut sse = r.stream(schedule, None).await;
    assert_eq!(
        sse.next(Duration::from_secs(2)).await,
        Some(SseFrame::Retry(3000))
    );
    let token = r.guest().await;
    let b = r.hold(&token, schedule, &[(1, 1), (1, 2)]).await;
    let id = b.booking_id();
    assert_eq!(r.confirm(&token, &id).await.status, 200);
    match sse.next_event(Duration::from_secs(2)).await {
        Some(SseFrame::Event {
            id: 1,
            action,
            mut seats,
        }) => {
            seats.sort();
            assert_eq!(action, "OCCUPIED");
            assert_eq!(seats, vec![(1, 1), (1, 2)]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        sse.next_event(Duration::from_secs(2)).await,
        Some(SseFrame::Event { id: 2, .. })
    ));
    db.assert_consistent().await;
}
