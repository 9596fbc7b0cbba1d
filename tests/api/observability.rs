//! What operators see: the `/metrics` families, the request id on every
//! response, and JSON log lines that carry it.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// The value of the one series of `family` whose labels include `labels`.
fn series(text: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(family))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_cover_requests_holds_events_listener_pool_and_streams() {
    let db = TestDb::create().await;
    let r = Replica::spawn(&db, ReplicaOpts::default()).await;
    let schedule = r.create_schedule(3, 3, &[]).await;
    let _viewer = r.subscribe(schedule, None).await;
    let [alice, bob] = r.guests().await;

    let a = r.hold(&alice, schedule, &[(1, 1)]).await;
    r.start(&bob, schedule, &[(1, 1)])
        .await
        .assert_problem(409, "seats_taken");
    assert_eq!(r.confirm(&alice, &a.booking_id()).await.status, 200);
    let b = r.hold(&bob, schedule, &[(2, 2)]).await;
    assert_eq!(r.cancel(&bob, &b.booking_id()).await.status, 200);

    // OCCUPIED, CONFIRMED, OCCUPIED, RELEASED: relayed through LISTEN.
    wait_for("4 events relayed", Duration::from_secs(5), || async {
        (r.metric("seatsync_events_relayed_total").await >= 4.0).then_some(())
    })
    .await;
    let text = r.metrics_text().await;
    let start = [("method", "POST"), ("route", "/api/bookings/start")];
    let expect = |family: &str, labels: &[(&str, &str)], want: f64| {
        let got = series(&text, family, labels)
            .unwrap_or_else(|| panic!("no {family} {labels:?} in:\n{text}"));
        assert_eq!(got, want, "{family} {labels:?}");
    };
    expect(
        "seatsync_http_requests_total",
        &[start[0], start[1], ("status", "201")],
        2.0,
    );
    expect(
        "seatsync_http_requests_total",
        &[start[0], start[1], ("status", "409")],
        1.0,
    );
    expect(
        "seatsync_http_request_duration_seconds_count",
        &[start[0], start[1], ("status", "201")],
        2.0,
    );
    assert!(
        series(
            &text,
            "seatsync_http_request_duration_seconds_bucket",
            &[start[0], start[1], ("status", "201"), ("le", "+Inf")]
        ) == Some(2.0),
        "latency is a histogram with buckets:\n{text}"
    );
    for (outcome, n) in [
        ("started", 2.0),
        ("conflicted", 1.0),
        ("confirmed", 1.0),
        ("cancelled", 1.0),
        ("expired", 0.0),
    ] {
        expect("seatsync_holds_total", &[("outcome", outcome)], n);
    }
    let lag = series(&text, "seatsync_event_commit_to_send_seconds_count", &[]).unwrap_or(0.0);
    assert!(lag >= 4.0, "commit-to-send lag observed {lag} times");
    let lag_sum = series(&text, "seatsync_event_commit_to_send_seconds_sum", &[]).unwrap();
    expect("seatsync_listener_reconnects_total", &[], 0.0);
    expect("seatsync_listener_up", &[], 1.0);
    expect("seatsync_sse_connections", &[], 1.0);
    expect("seatsync_sse_channels", &[], 1.0);
    for family in [
        "seatsync_db_pool_size",
        "seatsync_db_pool_available",
        "seatsync_db_pool_waiting",
    ] {
        assert!(series(&text, family, &[]).is_some(), "no {family}");
    }
    let families = text
        .lines()
        .filter(|l| l.starts_with("# TYPE seatsync_"))
        .count();
    println!(
        "metrics: {families} seatsync families; commit-to-send lag mean {:.1} ms over {lag} events",
        lag_sum / lag * 1000.0
    );
    db.assert_consistent().await;
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_sane_one_is_passed_on() {
    let db = TestDb::create().await;
    let r = Replica::spawn(&db, ReplicaOpts::default()).await;
    let fresh = r.http.get(r.url("/api/schedules")).send().await.unwrap();
    let id = fresh.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::try_parse(&id).is_ok(), "generated id {id:?}");
    let problem = r.http.get(r.url("/nope")).send().await.unwrap();
    assert!(problem.headers().contains_key("x-request-id"));

    let given = r
        .http
        .get(r.url("/api/schedules"))
        .header("x-request-id", "lb-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "lb-7f3a");
    // Too long for a log line: replaced, not echoed.
    let long = "x".repeat(200);
    let replaced = r
        .http
        .get(r.url("/api/schedules"))
        .header("x-request-id", &long)
        .send()
        .await
        .unwrap();
    assert_ne!(replaced.headers()["x-request-id"], long.as_str());
}

#[tokio::test]
async fn json_log_lines_of_a_request_carry_its_request_id() {
    let db = TestDb::create().await;
    let mut r =
        LoggedReplica::start(&db.url, &[("LOG_FORMAT", "json"), ("RUST_LOG", "info")]).await;
    let created = reqwest::Client::new()
        .post(r.url("/api/schedules"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({
            "title": "Logged", "startsAt": "2027-01-01T19:30:00Z", "rows": 2, "cols": 2
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();

    // Every line is JSON; the one the handler logged names the request.
    let raw = r
        .log_line(Duration::from_secs(10), |line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            v["fields"]["message"] == "schedule created"
        })
        .await;
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["span"]["request_id"], id.as_str(), "{raw}");
    assert_eq!(v["span"]["route"], "/api/schedules", "{raw}");
    println!("json log line: {raw}");
}
