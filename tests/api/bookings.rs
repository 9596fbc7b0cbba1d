//! Every endpoint of the contract and every status and code it names, over
//! real HTTP against a real replica and a real database.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

/// A time the contract promises in UTC, written with a Z.
fn time(v: &Value) -> DateTime<Utc> {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a time string: {v}"));
    assert!(s.ends_with('Z'), "times are UTC with a Z: {s}");
    timestamp(v)
}

/// A UUID in the lowercase hyphenated form the contract promises.
fn assert_lower_uuid(v: &Value) -> Uuid {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    let id = Uuid::parse_str(s).unwrap_or_else(|e| panic!("not a UUID: {s}: {e}"));
    assert_eq!(s, id.hyphenated().to_string(), "not lowercase hyphenated");
    id
}

fn snapshot_map(seats: &[((i64, i64), &str)]) -> BTreeMap<(i64, i64), String> {
    seats.iter().map(|(s, st)| (*s, st.to_string())).collect()
}

/// Rows in the bookings table: refused requests must write none.
async fn booking_rows(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM bookings", &[]).await
}

#[tokio::test]
async fn guest_tokens_are_issued_and_work_on_every_replica() {
    let (db, r) =
        TestDb::with_replica(ReplicaOpts::default().with("TOKEN_TTL_SECONDS", 3600)).await;
    let other = Replica::spawn(&db, ReplicaOpts::default()).await;

    let before = Utc::now();
    let g = r.post("/api/auth/guest", None, None).await;
    assert_eq!(g.status, 201, "{}", g.body);
    assert!(g.content_type().starts_with("application/json"));
    let token = g.body["token"].as_str().expect("token").to_owned();
    let user = assert_lower_uuid(&g.body["userId"]);
    let expires = time(&g.body["expiresAt"]);
    let ttl = expires - before;
    assert!(
        (ttl.num_seconds() - 3600).abs() <= 5,
        "token lives {ttl}, not TOKEN_TTL_SECONDS"
    );

    // The token is the HS256 JWT the contract describes: sub = userId, exp = expiresAt.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(AUTH_SECRET.as_bytes()),
        &validation,
    )
    .expect("a valid HS256 token signed with AUTH_SECRET")
    .claims;
    assert_eq!(claims["sub"], user.to_string());
    assert_eq!(claims["exp"].as_i64(), Some(expires.timestamp()));

    // Every call is a fresh anonymous user.
    let g2 = r.post("/api/auth/guest", None, None).await;
    assert_eq!(g2.status, 201);
    assert_ne!(g2.body["userId"], g.body["userId"]);
    assert_ne!(g2.body["token"], g.body["token"]);

    // The token works on the booking endpoints, on this replica and another.
    let schedule = r.create_schedule(3, 3, &[]).await;
    let b = other.hold(&token, schedule, &[(1, 1)]).await;
    let id = b.booking_id();
    let got = r.booking(&token, &id).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body, b.body);
    // ... and speaks for its own user only.
    let got = r
        .get(
            &format!("/api/bookings/{id}"),
            Some(g2.body["token"].as_str().unwrap()),
        )
        .await;
    got.assert_problem(404, "booking_not_found");
    db.assert_consistent().await;
}

#[tokio::test]
async fn guest_tokens_can_be_turned_off() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default().with("AUTH_GUEST", "false")).await;
    let g = r.post("/api/auth/guest", None, None).await;
    g.assert_problem(403, "forbidden");
    assert!(g.body.get("token").is_none(), "{}", g.body);
    // Tokens signed with the shared secret (by a replica that issues them) still work.
    let issuer = Replica::spawn(&db, ReplicaOpts::default()).await;
    let token = issuer.guest().await;
    let schedule = r.create_schedule(2, 2, &[]).await;
    r.hold(&token, schedule, &[(2, 2)]).await;
    db.assert_consistent().await;
}

#[tokio::test]
async fn schedules_are_created_by_the_admin_and_read_by_anyone() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    // Sub-microsecond digits: more precision than the database keeps.
    let body = json!({"title": "  Swan Lake  ", "startsAt": "2026-12-24T20:30:00.123456789+01:00",
                      "rows": 10, "cols": 20, "blocked": [{"row": 1, "col": 1}, {"row": 10, "col": 20}]});

    // Refused callers create nothing.
    let none = r.post("/api/schedules", None, Some(body.clone())).await;
    none.assert_problem(401, "unauthorized");
    assert_eq!(
        none.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    r.post(
        "/api/schedules",
        Some("wrong-admin-token-0123456789"),
        Some(body.clone()),
    )
    .await
    .assert_problem(403, "forbidden");
    let guest = r.guest().await;
    r.post("/api/schedules", Some(&guest), Some(body.clone()))
        .await
        .assert_problem(403, "forbidden");
    let list = r.get("/api/schedules", None).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.body, json!([]), "a refused create wrote a schedule");

    let created = r
        .post("/api/schedules", Some(ADMIN_TOKEN), Some(body))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let s = &created.body;
    let id = s["id"].as_i64().expect("numeric id");
    assert!(id > 0);
    assert_eq!(s["title"], "Swan Lake", "title is trimmed");
    // In UTC, and as stored: every replica must show the same time.
    assert_eq!(s["startsAt"], "2026-12-24T19:30:00.123456Z");
    assert_eq!(s["rows"], 10);
    assert_eq!(s["cols"], 20);
    assert_eq!(seat_set(&s["blocked"]), set_of(&[(1, 1), (10, 20)]));
    assert_eq!(s["maxSeatsPerBooking"], 4);
    assert_eq!(s["holdSeconds"], 300);

    let second = r.create_schedule(1, 1, &[]).await;
    assert_ne!(second, id);

    let list = r.get("/api/schedules", None).await;
    assert_eq!(list.status, 200);
    let listed = list.body.as_array().expect("a list");
    assert_eq!(listed.len(), 2, "{}", list.body);
    assert!(listed.contains(&created.body), "{}", list.body);

    let got = r.get(&format!("/api/schedules/{id}"), None).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, created.body);

    // Reading needs no token, and one sent there is ignored, even a bad one.
    for path in [
        "/api/schedules".to_owned(),
        format!("/api/schedules/{id}"),
        format!("/api/schedules/{id}/seat-status"),
    ] {
        let r2 = r.get(&path, Some("not-a-token")).await;
        assert_eq!(r2.status, 200, "{path}: {}", r2.body);
    }

    // Another replica (cold cache) reads the same schedule.
    let other = Replica::spawn(&db, ReplicaOpts::default()).await;
    assert_eq!(
        other.get(&format!("/api/schedules/{id}"), None).await.body,
        created.body
    );

    r.get(&format!("/api/schedules/{}", id + 1000), None)
        .await
        .assert_problem(404, "schedule_not_found");
    r.get(&format!("/api/schedules/{}/seat-status", id + 1000), None)
        .await
        .assert_problem(404, "schedule_not_found");
    r.get("/api/schedules/first", None)
        .await
        .assert_problem(400, "invalid_request");
    db.assert_consistent().await;
}

#[tokio::test]
async fn seat_status_lists_held_then_sold_seats() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(4, 4, &[(4, 4)]).await;

    let raw = r
        .get(&format!("/api/schedules/{schedule}/seat-status"), None)
        .await;
    assert_eq!(raw.status, 200);
    assert_eq!(
        raw.body,
        json!({"scheduleId": schedule, "lastEventId": "0", "seats": []}),
        "blocked seats are not listed; lastEventId is the string \"0\" at start"
    );

    let [alice, bob] = r.guests().await;
    let a = r.hold(&alice, schedule, &[(1, 1), (1, 2)]).await;
    assert_eq!(
        r.snapshot(schedule).await,
        (
            1,
            snapshot_map(&[((1, 1), "OCCUPIED"), ((1, 2), "OCCUPIED")])
        )
    );
    db.assert_consistent().await;

    assert_eq!(r.confirm(&alice, &a.booking_id()).await.status, 200);
    let b = r.hold(&bob, schedule, &[(2, 3)]).await;
    assert_eq!(
        r.snapshot(schedule).await,
        (
            3,
            snapshot_map(&[
                ((1, 1), "CONFIRMED"),
                ((1, 2), "CONFIRMED"),
                ((2, 3), "OCCUPIED")
            ])
        )
    );
    db.assert_consistent().await;

    assert_eq!(r.cancel(&bob, &b.booking_id()).await.status, 200);
    assert_eq!(
        r.snapshot(schedule).await,
        (
            4,
            snapshot_map(&[((1, 1), "CONFIRMED"), ((1, 2), "CONFIRMED")])
        )
    );
    // Another schedule's snapshot is its own.
    let empty = r.create_schedule(2, 2, &[]).await;
    assert_eq!(r.snapshot(empty).await, (0, BTreeMap::new()));
    db.assert_consistent().await;
}

#[tokio::test]
async fn start_holds_every_seat_in_one_event() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(5, 5, &[]).await;
    let token = r.guest().await;

    let before = Utc::now();
    let seats = [(3, 4), (1, 2), (5, 5), (2, 1)];
    let b = r.start(&token, schedule, &seats).await;
    let after = Utc::now();
    assert_eq!(b.status, 201, "{}", b.body);
    assert!(b.content_type().starts_with("application/json"));
    let id = assert_lower_uuid(&b.body["bookingId"]);
    assert_eq!(b.body["scheduleId"], schedule);
    assert_eq!(b.body["status"], "PENDING");
    assert_eq!(seat_set(&b.body["seats"]), set_of(&seats));
    assert_eq!(b.body["seats"].as_array().unwrap().len(), 4);
    let expires = time(&b.body["expiresAt"]);
    let hold = chrono::Duration::seconds(300);
    let slack = chrono::Duration::seconds(2);
    assert!(
        expires >= before + hold - slack && expires <= after + hold + slack,
        "expiresAt {expires} is not holdSeconds (300) after the start ({before}..{after})"
    );
    // All four seats held, by exactly one OCCUPIED event.
    let (last, map) = r.snapshot(schedule).await;
    assert_eq!(last, 1);
    assert_eq!(
        map,
        seats.iter().map(|s| (*s, "OCCUPIED".to_owned())).collect()
    );
    let events = db
        .client()
        .await
        .query(
            "SELECT event_id, action, seats FROM seat_events WHERE schedule_id = $1",
            &[&schedule],
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].get::<_, String>(1), "OCCUPIED");
    assert_eq!(seat_set(&events[0].get::<_, Value>(2)), set_of(&seats));

    let got = r.booking(&token, &id).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b.body);

    // `charset` on the content type is fine.
    let other = r.guest().await;
    let c = r
        .http
        .post(r.url("/api/bookings/start"))
        .bearer_auth(&other)
        .header("content-type", "application/json; charset=utf-8")
        .body(start_body(schedule, &[(4, 4)]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(c.status(), 201);
    db.assert_consistent().await;
}

#[tokio::test]
async fn seats_taken_names_exactly_the_taken_requested_seats() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(5, 5, &[]).await;
    let [alice, bob, carol] = r.guests().await;

    let a = r.hold(&alice, schedule, &[(1, 1), (1, 2)]).await;
    assert_eq!(r.confirm(&alice, &a.booking_id()).await.status, 200);
    let b = r.hold(&bob, schedule, &[(2, 2), (2, 3)]).await;
    let before = r.snapshot(schedule).await;
    let rows = booking_rows(&db).await;

    // One sold seat, one held seat, two free ones.
    let c = r
        .start(&carol, schedule, &[(3, 3), (1, 2), (2, 3), (4, 4)])
        .await;
    c.assert_problem(409, "seats_taken");
    assert_eq!(seat_set(&c.body["seats"]), set_of(&[(1, 2), (2, 3)]));
    assert_eq!(c.body["seats"].as_array().unwrap().len(), 2, "{}", c.body);

    // Only held seats.
    let c = r.start(&carol, schedule, &[(2, 2)]).await;
    c.assert_problem(409, "seats_taken");
    assert_eq!(seat_set(&c.body["seats"]), set_of(&[(2, 2)]));

    // Nothing was held, no event, no booking row.
    assert_eq!(r.snapshot(schedule).await, before);
    assert_eq!(booking_rows(&db).await, rows);
    db.assert_consistent().await;

    // Carol has no phantom pending booking: the free seats are hers now.
    r.hold(&carol, schedule, &[(3, 3), (4, 4)]).await;

    // A seat freed by a cancel is free again at once.
    assert_eq!(r.cancel(&bob, &b.booking_id()).await.status, 200);
    let dave = r.guest().await;
    r.hold(&dave, schedule, &[(2, 2), (2, 3)]).await;
    db.assert_consistent().await;
}

#[tokio::test]
async fn one_pending_booking_per_user_and_schedule() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(5, 5, &[]).await;
    let elsewhere = r.create_schedule(5, 5, &[]).await;
    let token = r.guest().await;

    let first = r.hold(&token, schedule, &[(1, 1)]).await;
    let before = r.snapshot(schedule).await;
    let again = r.start(&token, schedule, &[(2, 2)]).await;
    again.assert_problem(409, "booking_in_progress");
    assert_eq!(again.body["bookingId"], first.body["bookingId"]);
    assert_eq!(r.snapshot(schedule).await, before, "nothing was held");
    db.assert_consistent().await;

    // Another schedule is another matter.
    r.hold(&token, elsewhere, &[(2, 2)]).await;

    // Once the pending one is confirmed, the user may start another.
    assert_eq!(r.confirm(&token, &first.booking_id()).await.status, 200);
    let second = r.hold(&token, schedule, &[(2, 2)]).await;
    // ... and once it is cancelled, too.
    r.start(&token, schedule, &[(3, 3)])
        .await
        .assert_problem(409, "booking_in_progress");
    assert_eq!(r.cancel(&token, &second.booking_id()).await.status, 200);
    r.hold(&token, schedule, &[(3, 3)]).await;
    db.assert_consistent().await;
}

#[tokio::test]
async fn idempotency_key_replays_refuses_reuse_and_frees_after_cancel() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(5, 5, &[]).await;
    let elsewhere = r.create_schedule(5, 5, &[]).await;
    let token = r.guest().await;
    let key = "order-7f3a:checkout ~ retry #1";

    let first = r
        .start_with_key(&token, schedule, &[(1, 1), (1, 2)], key)
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    let after_first = r.snapshot(schedule).await;
    assert_eq!(after_first.0, 1);
    let rows = booking_rows(&db).await;

    // Same key, same body: the same 201 response, no new booking, no event.
    let replay = r
        .start_with_key(&token, schedule, &[(1, 1), (1, 2)], key)
        .await;
    assert_eq!(replay.status, 201, "{}", replay.body);
    assert_eq!(replay.body, first.body);
    // Seat order does not make a different body.
    let reordered = r
        .start_with_key(&token, schedule, &[(1, 2), (1, 1)], key)
        .await;
    assert_eq!(reordered.status, 201, "{}", reordered.body);
    assert_eq!(reordered.booking_id(), first.booking_id());
    assert_eq!(
        r.snapshot(schedule).await,
        after_first,
        "no second OCCUPIED"
    );
    assert_eq!(booking_rows(&db).await, rows);

    // Same key, another body: refused, nothing changes.
    for (sched, seats) in [
        (schedule, vec![(1, 1)]),
        (schedule, vec![(1, 1), (1, 2), (1, 3)]),
        (schedule, vec![(4, 4)]),
        (elsewhere, vec![(1, 1), (1, 2)]),
    ] {
        let r2 = r.start_with_key(&token, sched, &seats, key).await;
        r2.assert_problem(409, "idempotency_key_reused");
    }
    assert_eq!(r.snapshot(schedule).await, after_first);
    assert_eq!(r.snapshot(elsewhere).await.0, 0);
    assert_eq!(booking_rows(&db).await, rows);
    db.assert_consistent().await;

    // Without the key, the same user is still one-pending-at-a-time.
    r.start(&token, schedule, &[(1, 1), (1, 2)])
        .await
        .assert_problem(409, "booking_in_progress");

    // Keys belong to their user: another user's same key is unrelated.
    let other = r.guest().await;
    let o = r.start_with_key(&other, schedule, &[(3, 3)], key).await;
    assert_eq!(o.status, 201, "{}", o.body);
    assert_ne!(o.booking_id(), first.booking_id());

    // The longest key allowed (255 printable characters) works.
    let long = "k".repeat(255);
    let l = r.start_with_key(&token, elsewhere, &[(5, 5)], &long).await;
    assert_eq!(l.status, 201, "{}", l.body);
    let l2 = r.start_with_key(&token, elsewhere, &[(5, 5)], &long).await;
    assert_eq!(l2.body, l.body);

    // A confirmed booking still exists: a retry of its start is answered
    // with that booking (as it is now), and holds nothing new.
    assert_eq!(r.confirm(&token, &l.booking_id()).await.status, 200);
    let sold = r.snapshot(elsewhere).await;
    let l3 = r.start_with_key(&token, elsewhere, &[(5, 5)], &long).await;
    assert_eq!(l3.status, 201, "{}", l3.body);
    assert_eq!(l3.booking_id(), l.booking_id());
    assert_eq!(l3.body["status"], "CONFIRMED");
    r.start_with_key(&token, elsewhere, &[(5, 4)], &long)
        .await
        .assert_problem(409, "idempotency_key_reused");
    assert_eq!(r.snapshot(elsewhere).await, sold);

    // Once cancelled, the key may be used again: a new booking.
    let cancelled = r.cancel(&token, &first.booking_id()).await;
    assert_eq!(cancelled.status, 200);
    let anew = r
        .start_with_key(&token, schedule, &[(1, 1), (1, 2)], key)
        .await;
    assert_eq!(anew.status, 201, "{}", anew.body);
    assert_ne!(anew.booking_id(), first.booking_id());
    assert_eq!(anew.body["status"], "PENDING");
    // ... and the old booking stays cancelled.
    let old = r.booking(&token, &first.booking_id()).await;
    assert_eq!(old.body["status"], "CANCELLED");
    db.assert_consistent().await;
}

#[tokio::test]
async fn bookings_exist_only_for_their_owner() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(3, 3, &[]).await;
    let [owner, stranger] = r.guests().await;
    let b = r.hold(&owner, schedule, &[(2, 2)]).await;
    let id = b.booking_id();

    let got = r.booking(&owner, &id).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, b.body);
    // Any case is accepted; the id comes back lowercase.
    let upper = r.booking(&owner, &id.to_uppercase()).await;
    assert_eq!(upper.status, 200, "{}", upper.body);
    assert_eq!(upper.body["bookingId"], id);

    // To a stranger it does not exist: byte for byte the answer for an unknown id.
    let unknown = r.booking(&owner, Uuid::new_v4()).await;
    unknown.assert_problem(404, "booking_not_found");
    let before = r.snapshot(schedule).await;
    for method in ["get", "confirm", "cancel"] {
        let theirs = match method {
            "get" => r.booking(&stranger, &id).await,
            "confirm" => r.confirm(&stranger, &id).await,
            _ => r.cancel(&stranger, &id).await,
        };
        theirs.assert_problem(404, "booking_not_found");
        assert_eq!(theirs.body, unknown.body, "{method} leaks existence");
        let nobody = match method {
            "get" => r.booking(&owner, Uuid::new_v4()).await,
            "confirm" => r.confirm(&owner, &Uuid::new_v4().to_string()).await,
            _ => r.cancel(&owner, &Uuid::new_v4().to_string()).await,
        };
        assert_eq!(nobody.body, unknown.body, "{method}");
    }
    // The stranger changed nothing.
    assert_eq!(r.snapshot(schedule).await, before);
    let got = r.booking(&owner, &id).await;
    assert_eq!(got.body["status"], "PENDING");

    r.get("/api/bookings/not-a-uuid", Some(&owner))
        .await
        .assert_problem(400, "invalid_request");
    db.assert_consistent().await;
}

#[tokio::test]
async fn confirm_and_cancel_are_idempotent_and_final() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(3, 3, &[]).await;
    let [alice, bob] = r.guests().await;

    // Confirm: 200 CONFIRMED, one event; again: the same, no event.
    let a = r.start(&alice, schedule, &[(1, 1), (1, 2)]).await;
    let a_id = a.booking_id();
    let c = r.confirm(&alice, &a_id).await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.body["status"], "CONFIRMED");
    assert_eq!(c.body["bookingId"], a_id);
    assert_eq!(seat_set(&c.body["seats"]), set_of(&[(1, 1), (1, 2)]));
    let after_confirm = r.snapshot(schedule).await;
    assert_eq!(
        after_confirm,
        (
            2,
            snapshot_map(&[((1, 1), "CONFIRMED"), ((1, 2), "CONFIRMED")])
        )
    );
    // (Any case names the same booking.)
    let c2 = r.confirm(&alice, &a_id.to_uppercase()).await;
    assert_eq!(c2.status, 200);
    assert_eq!(c2.body, c.body);
    assert_eq!(r.snapshot(schedule).await, after_confirm);
    // A sold booking cannot be cancelled.
    r.cancel(&alice, &a_id)
        .await
        .assert_problem(409, "booking_confirmed");
    assert_eq!(r.snapshot(schedule).await, after_confirm);
    db.assert_consistent().await;

    // Cancel: 200 CANCELLED, one RELEASED; again: the same, no event.
    let b = r.start(&bob, schedule, &[(3, 3)]).await;
    let b_id = b.booking_id();
    let x = r.cancel(&bob, &b_id).await;
    assert_eq!(x.status, 200, "{}", x.body);
    assert_eq!(x.body["status"], "CANCELLED");
    assert_eq!(x.body["bookingId"], b_id);
    let after_cancel = r.snapshot(schedule).await;
    assert_eq!(after_cancel, (after_confirm.0 + 2, after_confirm.1.clone()));
    let x2 = r.cancel(&bob, &b_id.to_uppercase()).await;
    assert_eq!(x2.status, 200);
    assert_eq!(x2.body, x.body);
    // A cancelled booking cannot be confirmed.
    r.confirm(&bob, &b_id)
        .await
        .assert_problem(409, "booking_cancelled");
    assert_eq!(r.snapshot(schedule).await, after_cancel);
    let got = r.booking(&bob, &b_id).await;
    assert_eq!(got.body["status"], "CANCELLED");
    db.assert_consistent().await;
}

#[tokio::test]
async fn expired_bookings_refuse_confirm_and_cancel() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default().with("HOLD_SECONDS", 2)).await;
    let schedule = r.create_schedule(3, 3, &[]).await;
    assert_eq!(
        r.get(&format!("/api/schedules/{schedule}"), None)
            .await
            .body["holdSeconds"],
        2
    );
    let [alice, bob] = r.guests().await;
    let key = "expiring-key";
    let a = r
        .start_with_key(&alice, schedule, &[(1, 1), (2, 2)], key)
        .await;
    assert_eq!(a.status, 201);
    let a_id = a.booking_id();
    let b = r.start(&bob, schedule, &[(3, 3)]).await;
    let b_id = b.booking_id();

    let path = format!("/api/bookings/{a_id}");
    // Bob's hold started after Alice's, so it may still be live when hers
    // has expired: wait for each one's own expiry.
    for (token, id) in [(&alice, &a_id), (&bob, &b_id)] {
        let path = format!("/api/bookings/{id}");
        wait_for("the hold to expire", Duration::from_secs(10), || async {
            (r.get(&path, Some(token)).await.body["status"] == "EXPIRED").then_some(())
        })
        .await;
    }
    r.confirm(&alice, &a_id)
        .await
        .assert_problem(410, "booking_expired");
    r.cancel(&alice, &a_id)
        .await
        .assert_problem(410, "booking_expired");
    r.cancel(&bob, &b_id)
        .await
        .assert_problem(410, "booking_expired");
    r.confirm(&bob, &b_id)
        .await
        .assert_problem(410, "booking_expired");

    // The seats are released (with their events) and the map is empty again.
    wait_for("seats released", Duration::from_secs(5), || async {
        r.snapshot(schedule).await.1.is_empty().then_some(())
    })
    .await;
    let released = db
        .count(
            "SELECT count(*) FROM seat_events WHERE schedule_id = $1 AND action = 'RELEASED'",
            &[&schedule],
        )
        .await;
    assert_eq!(released, 2, "one RELEASED per expired booking");
    db.assert_consistent().await;

    // The key is free again once its booking expired: a new booking.
    let again = r
        .start_with_key(&alice, schedule, &[(1, 1), (2, 2)], key)
        .await;
    assert_eq!(again.status, 201, "{}", again.body);
    assert_ne!(again.booking_id(), a_id);
    // The expired booking stays expired.
    assert_eq!(r.get(&path, Some(&alice)).await.body["status"], "EXPIRED");
    db.assert_consistent().await;
}

#[tokio::test]
async fn booking_endpoints_need_a_valid_bearer_token() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let schedule = r.create_schedule(2, 2, &[]).await;
    let token = r.guest().await;
    let b = r.start(&token, schedule, &[(1, 1)]).await;
    let id = b.booking_id();
    let before = r.snapshot(schedule).await;

    let calls: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/api/bookings/start".into(),
            Some(start_body(schedule, &[(2, 2)])),
        ),
        (Method::GET, format!("/api/bookings/{id}"), None),
        (Method::POST, format!("/api/bookings/{id}/confirm"), None),
        (Method::POST, format!("/api/bookings/{id}/cancel"), None),
    ];
    for (method, path, body) in &calls {
        for bad in [None, Some("garbage"), Some(ADMIN_TOKEN)] {
            let res = r
                .request(method.clone(), path, bad, body.clone(), &[])
                .await;
            res.assert_problem(401, "unauthorized");
            assert_eq!(
                res.headers
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {path}"
            );
        }
    }
    assert_eq!(r.snapshot(schedule).await, before);
    assert_eq!(r.booking(&token, &id).await.body["status"], "PENDING");
    db.assert_consistent().await;
}

#[tokio::test]
async fn operations_endpoints_and_unknown_routes() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;

    assert_eq!(r.get("/healthz", None).await.status, 200);
    let ready = r.get("/readyz", None).await;
    assert_eq!(ready.status, 200, "{}", ready.body);

    // OpenAPI 3, listing every path of the contract with its methods.
    let doc = r.get("/api/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    assert!(doc.content_type().starts_with("application/json"));
    let version = doc.body["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "{version}");
    let paths = doc.body["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/api/auth/guest", "post"),
        ("/api/schedules", "post"),
        ("/api/schedules", "get"),
        ("/api/schedules/{id}", "get"),
        ("/api/schedules/{id}/seat-status", "get"),
        ("/api/schedules/{id}/seats/stream", "get"),
        ("/api/bookings/start", "post"),
        ("/api/bookings/{id}", "get"),
        ("/api/bookings/{id}/confirm", "post"),
        ("/api/bookings/{id}/cancel", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "openapi lacks {method} {path}"
        );
    }

    // Prometheus text, with the booking counters once something happened.
    let schedule = r.create_schedule(2, 2, &[]).await;
    let token = r.guest().await;
    r.hold(&token, schedule, &[(1, 1)]).await;
    let m = r.http.get(r.url("/metrics")).send().await.unwrap();
    assert_eq!(m.status(), 200);
    let ct = m.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = m.text().await.unwrap();
    assert_prometheus_text(&text);
    assert!(
        text.contains("seatsync_booking_starts_total"),
        "no booking counter in:\n{text}"
    );
    assert_eq!(r.metric("seatsync_booking_starts_total").await, 1.0);

    // Unknown routes and wrong methods answer in problem+json too.
    for path in ["/nope", "/api/bookings", "/api/schedules/1/seats/nope"] {
        r.get(path, None).await.assert_problem(404, "not_found");
    }
    for (method, path) in [
        (Method::DELETE, "/api/schedules".to_owned()),
        (Method::PUT, format!("/api/schedules/{schedule}")),
        (Method::GET, "/api/bookings/start".to_owned()),
        (
            Method::GET,
            format!("/api/bookings/{}/confirm", Uuid::new_v4()),
        ),
        (Method::POST, "/healthz".to_owned()),
    ] {
        let res = r.request(method.clone(), &path, None, None, &[]).await;
        res.assert_problem(405, "method_not_allowed");
        assert!(
            res.headers.contains_key("allow"),
            "{method} {path}: a 405 must say what is allowed"
        );
    }
    db.assert_consistent().await;
}

/// Every line is a comment, blank, or `name{labels} value`.
fn assert_prometheus_text(text: &str) {
    assert!(!text.trim().is_empty(), "empty metrics");
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "bad comment line: {line}"
            );
            if let Some(t) = rest.strip_prefix("TYPE ") {
                let kind = t.split_whitespace().nth(1).unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad TYPE line: {line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name: {line}"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "bad labels: {line}");
        }
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "bad sample value: {line}"
        );
    }
}
