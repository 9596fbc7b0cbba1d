//! Table-driven bad inputs: every one must get a 4xx problem+json with the
//! right code (and, for `invalid_request`, the offending field named), and
//! must change nothing: same snapshot, same lastEventId, no row written.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::HeaderValue;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::*;

const ROWS: i64 = 5;
const COLS: i64 = 6;
const BLOCKED: (i64, i64) = (2, 2);
/// Free in the fixture, so a request that wrongly succeeded would show.
const FREE: (i64, i64) = (4, 4);
const FREE2: (i64, i64) = (4, 5);
const HUGE: usize = 100 * 1024;
/// The contract's body limit.
const LIMIT: usize = 64 * 1024;

/// How the request authenticates.
#[derive(Clone)]
enum Auth {
    /// A valid token of the test's own user (or the admin token).
    Valid,
    None,
    /// This exact `Authorization` header value.
    Raw(HeaderValue),
}

#[derive(Clone)]
enum Payload {
    None,
    Bytes(Vec<u8>),
    /// Sent without a Content-Length (chunked).
    Chunked(Vec<u8>),
}

struct Case {
    name: String,
    auth: Auth,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Payload,
    status: u16,
    code: &'static str,
    /// For `invalid_request`: the field the problem must name.
    field: Option<&'static str>,
}

impl Case {
    fn json(name: &str, body: Value) -> Self {
        Self::raw(name, body.to_string().into_bytes())
    }

    fn raw(name: &str, body: impl Into<Vec<u8>>) -> Self {
        Case {
            name: name.to_owned(),
            auth: Auth::Valid,
            content_type: Some("application/json"),
            headers: vec![],
            body: Payload::Bytes(body.into()),
            status: 400,
            code: "invalid_request",
            field: None,
        }
    }

    fn field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    fn expect(mut self, status: u16, code: &'static str) -> Self {
        self.status = status;
        self.code = code;
        if code != "invalid_request" {
            self.field = None;
        }
        self
    }

    fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    fn bearer(self, token: &str) -> Self {
        self.auth(Auth::Raw(
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        ))
    }

    fn content_type(mut self, ct: Option<&'static str>) -> Self {
        self.content_type = ct;
        self
    }

    fn header(mut self, name: &'static str, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    fn chunked(mut self) -> Self {
        if let Payload::Bytes(b) = self.body {
            self.body = Payload::Chunked(b);
        }
        self
    }

    async fn send(&self, r: &Replica, method: Method, path: &str, token: &str) -> ApiResponse {
        let mut req = r.http.request(method, r.url(path));
        match &self.auth {
            Auth::Valid => req = req.bearer_auth(token),
            Auth::None => {}
            Auth::Raw(v) => req = req.header("authorization", v.clone()),
        }
        if let Some(ct) = self.content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in &self.headers {
            req = req.header(*k, v.clone());
        }
        match &self.body {
            Payload::None => {}
            Payload::Bytes(b) => req = req.body(b.clone()),
            Payload::Chunked(b) => {
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                    b.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
                req = req.body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)));
            }
        }
        let res = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: request failed: {e}", self.name));
        ApiResponse::from(res).await
    }

    /// What is wrong with the answer to this case, if anything.
    fn problems(&self, res: &ApiResponse) -> Vec<String> {
        let mut out = Vec::new();
        let b = &res.body;
        if res.status != self.status || b["code"] != self.code {
            out.push(format!("want {} {}", self.status, self.code));
        }
        if res.content_type() != "application/problem+json" {
            out.push(format!("content type {:?}", res.content_type()));
        }
        if res.status == 413
            && res.headers.get("connection").and_then(|v| v.to_str().ok()) != Some("close")
        {
            // The body is left unread: the connection must not be reused.
            out.push("413 without Connection: close".into());
        }
        if b["status"] != res.status {
            out.push("status member differs from the HTTP status".into());
        }
        for member in ["type", "title", "detail"] {
            if !b[member].is_string() {
                out.push(format!("no {member} member"));
            }
        }
        if let Some(field) = self.field {
            if b["field"] != field {
                out.push(format!("want field {field:?}"));
            }
            if !b["detail"].as_str().unwrap_or("").contains(field) {
                out.push(format!("detail does not name {field:?}"));
            }
        }
        out
    }
}

/// Runs every case, checking after each that nothing changed, and reports
/// all failing cases at once.
async fn run_cases<S, F>(cases: &[Case], mut send: S, mut state: F)
where
    S: AsyncFnMut(&Case) -> ApiResponse,
    F: AsyncFnMut() -> String,
{
    let before = state().await;
    let mut failures = Vec::new();
    for case in cases {
        // Names the case should the request itself fail.
        eprintln!("case: {}", case.name);
        let res = send(case).await;
        let mut problems = case.problems(&res);
        let after = state().await;
        if after != before {
            problems.push(format!(
                "state changed:\n  before {before}\n  after  {after}"
            ));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: got {} {}\n    {}",
                case.name,
                res.status,
                res.body,
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// `json` (an object) padded with whitespace to exactly `len` bytes.
fn padded(json: &str, len: usize) -> String {
    let mut out = json[..json.len() - 1].to_owned();
    out.push_str(&" ".repeat(len - json.len()));
    out.push('}');
    assert_eq!(out.len(), len);
    out
}

/// Base64url without padding, for hand-made JWTs.
fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A JWT built by hand: this header and these claims, signed with HS256
/// and `secret` (or not at all, when `secret` is None).
fn hand_made(header: Value, claims: Value, secret: Option<&str>) -> String {
    let message = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = match secret {
        Some(secret) => jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
        .unwrap(),
        None => String::new(),
    };
    format!("{message}.{signature}")
}

fn jwt(secret: &str, alg: Algorithm, claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Counts of every table a refused request must leave alone.
async fn row_counts(db: &TestDb) -> (i64, i64, i64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM bookings), (SELECT count(*) FROM seat_events), \
                    (SELECT count(*) FROM schedules), (SELECT count(*) FROM schedule_seat_status)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

fn seat(s: (i64, i64)) -> Value {
    json!({"row": s.0, "col": s.1})
}

#[tokio::test]
async fn bad_start_requests_are_refused_and_change_nothing() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let sid = r.create_schedule(ROWS, COLS, &[BLOCKED]).await;
    // Some state worth keeping: a held and a sold booking.
    let [alice, bob] = r.guests().await;
    r.hold(&alice, sid, &[(1, 1), (1, 2)]).await;
    let b = r.start(&bob, sid, &[(3, 3)]).await;
    assert_eq!(r.confirm(&bob, &b.booking_id()).await.status, 200);
    let token = r.guest().await;

    let good = |seats: &[(i64, i64)]| json!({"scheduleId": sid, "seats": seats.iter().map(|s| seat(*s)).collect::<Vec<_>>()});
    let good_text = good(&[FREE]).to_string();
    let with_row =
        |row: Value| json!({"scheduleId": sid, "seats": [seat(FREE2), {"row": row, "col": 1}]});
    let with_sid = |id: Value| json!({"scheduleId": id, "seats": [seat(FREE)]});
    // Valid bodies padded past the limit: if the limit failed, they would hold FREE.
    let huge = padded(&good_text, HUGE);
    let over = padded(&good_text, LIMIT + 1);
    let nested = format!(
        "{{\"scheduleId\": {sid}, \"seats\": {}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );

    let secret_sub = Uuid::new_v4().to_string();
    let exp = now() + 3600;
    let forged = jwt(
        "some-other-secret-0123456789",
        Algorithm::HS256,
        json!({"sub": secret_sub, "exp": exp, "iat": now()}),
    );
    let expired = jwt(
        AUTH_SECRET,
        Algorithm::HS256,
        json!({"sub": secret_sub, "exp": now() - 3600, "iat": now() - 7200}),
    );
    let hs512 = jwt(
        AUTH_SECRET,
        Algorithm::HS512,
        json!({"sub": secret_sub, "exp": exp, "iat": now()}),
    );
    let bad_sub = jwt(
        AUTH_SECRET,
        Algorithm::HS256,
        json!({"sub": "alice", "exp": exp, "iat": now()}),
    );
    let no_exp = jwt(
        AUTH_SECRET,
        Algorithm::HS256,
        json!({"sub": secret_sub, "iat": now()}),
    );
    // Hand-made tokens: the control (the contract's minimum, sub and exp)
    // must work, so each variant below is refused for what it changes.
    let hs256 = json!({"alg": "HS256", "typ": "JWT"});
    let claims = json!({"sub": secret_sub, "exp": exp});
    let control = hand_made(hs256.clone(), claims.clone(), Some(AUTH_SECRET));
    let unknown = format!("/api/bookings/{}", Uuid::new_v4());
    for t in [
        control.as_str(),
        &jwt(AUTH_SECRET, Algorithm::HS256, claims.clone()),
    ] {
        r.get(&unknown, Some(t))
            .await
            .assert_problem(404, "booking_not_found");
    }
    let alg_none = hand_made(json!({"alg": "none", "typ": "JWT"}), claims.clone(), None);
    let alg_none_signed = hand_made(
        json!({"alg": "none", "typ": "JWT"}),
        claims.clone(),
        Some(AUTH_SECRET),
    );
    let unsigned = hand_made(hs256.clone(), claims.clone(), None);
    let other_secret = hand_made(
        hs256.clone(),
        claims.clone(),
        Some("some-other-secret-0123456789"),
    );
    let tampered = {
        // The control with its payload swapped for another user's.
        let parts: Vec<&str> = control.split('.').collect();
        let payload = b64url(
            json!({"sub": Uuid::new_v4().to_string(), "exp": exp})
                .to_string()
                .as_bytes(),
        );
        format!("{}.{}.{}", parts[0], payload, parts[2])
    };

    let key = |v: HeaderValue| Case::json("", good(&[FREE])).header("idempotency-key", v);
    let hv = |s: &str| HeaderValue::from_str(s).unwrap();

    let cases: Vec<Case> = vec![
        // Not JSON, or not one JSON value.
        Case::raw("malformed JSON", format!("{{\"scheduleId\": {sid},")).field("body"),
        Case::raw("unquoted key", "{scheduleId: 1, \"seats\": []}").field("body"),
        // A body that breaks inside a member names that member.
        Case::raw("truncated in seats", format!("{{\"scheduleId\": {sid}, \"seats\": [")).field("seats"),
        Case::raw("trailing garbage", format!("{good_text} x")).field("body"),
        Case::raw("two JSON values", format!("{good_text}{good_text}")).field("body"),
        Case::raw("empty body", "").field("body"),
        Case::raw("byte order mark", format!("\u{feff}{good_text}")).field("body"),
        Case::raw("invalid UTF-8", b"{\"scheduleId\": \"\xff\xfe\", \"seats\": []}".to_vec()).field("scheduleId"),
        Case::raw("nesting bomb", nested).field("seats[0]"),
        // Content type.
        Case::raw("no content type", good_text.clone()).content_type(None).field("Content-Type"),
        Case::raw("text/plain", good_text.clone()).content_type(Some("text/plain")).field("Content-Type"),
        Case::raw("form", good_text.clone()).content_type(Some("application/x-www-form-urlencoded")).field("Content-Type"),
        Case::raw("application/jsonp", good_text.clone()).content_type(Some("application/jsonp")).field("Content-Type"),
        // Shape.
        Case::json("unknown field", json!({"scheduleId": sid, "seats": [seat(FREE)], "price": 0})).field("price"),
        Case::json("unknown seat field", json!({"scheduleId": sid, "seats": [{"row": 4, "col": 4, "section": "A"}]})).field("seats[0].section"),
        Case::json("missing scheduleId", json!({"seats": [seat(FREE)]})).field("scheduleId"),
        Case::json("missing seats", json!({"scheduleId": sid})).field("seats"),
        Case::json("missing col", json!({"scheduleId": sid, "seats": [{"row": 4}]})).field("seats[0].col"),
        Case::raw("duplicate key", format!("{{\"scheduleId\": {sid}, \"scheduleId\": {sid}, \"seats\": [{{\"row\": 4, \"col\": 4}}]}}")).field("scheduleId"),
        // Types.
        Case::json("string row", with_row(json!("1"))).field("seats[1].row"),
        Case::json("float col", json!({"scheduleId": sid, "seats": [{"row": 4, "col": 4.5}]})).field("seats[0].col"),
        Case::json("integral float col", json!({"scheduleId": sid, "seats": [{"row": 4, "col": 4.0}]})).field("seats[0].col"),
        Case::json("null row", with_row(Value::Null)).field("seats[1].row"),
        Case::json("boolean row", with_row(json!(true))).field("seats[1].row"),
        Case::json("null scheduleId", with_sid(Value::Null)).field("scheduleId"),
        Case::json("string scheduleId", with_sid(json!(sid.to_string()))).field("scheduleId"),
        Case::json("float scheduleId", with_sid(json!(sid as f64))).field("scheduleId"),
        Case::json("null seats", json!({"scheduleId": sid, "seats": null})).field("seats"),
        Case::json("seats is an object", json!({"scheduleId": sid, "seats": seat(FREE)})).field("seats"),
        Case::json("body is an array", json!([good(&[FREE])])).field("body"),
        Case::json("body is a positional array", json!([sid, [seat(FREE)]])).field("body"),
        Case::json("seat is a positional array", json!({"scheduleId": sid, "seats": [[4, 4]]})).field("seats[0]"),
        Case::json("body is a string", json!("hello")).field("body"),
        Case::json("body is null", Value::Null).field("body"),
        // Numbers out of range.
        Case::json("row 1e30", with_row(json!(1e30))).field("seats[1].row"),
        Case::raw("row 20 digits", format!("{{\"scheduleId\": {sid}, \"seats\": [{{\"row\": 99999999999999999999, \"col\": 1}}]}}")).field("seats[0].row"),
        Case::json("row i64::MAX", with_row(json!(i64::MAX))).field("seats[1].row"),
        Case::json("row i64::MIN", with_row(json!(i64::MIN))).field("seats[1].row"),
        Case::json("col u64::MAX", json!({"scheduleId": sid, "seats": [{"row": 4, "col": u64::MAX}]})).field("seats[0].col"),
        Case::raw("scheduleId 20 digits", "{\"scheduleId\": 99999999999999999999, \"seats\": [{\"row\": 4, \"col\": 4}]}").field("scheduleId"),
        Case::json("scheduleId 2^63", with_sid(json!(1u64 << 63))).field("scheduleId"),
        Case::json("scheduleId 1e30", with_sid(json!(1e30))).field("scheduleId"),
        Case::json("scheduleId -1", with_sid(json!(-1))).field("scheduleId"),
        Case::json("scheduleId 0", with_sid(json!(0))).field("scheduleId"),
        Case::json("scheduleId i64::MIN", with_sid(json!(i64::MIN))).field("scheduleId"),
        Case::json("scheduleId i64::MAX", with_sid(json!(i64::MAX))).expect(404, "schedule_not_found"),
        Case::json("unknown scheduleId", with_sid(json!(sid + 1000))).expect(404, "schedule_not_found"),
        // Seats the schedule cannot give.
        Case::json("zero seats", good(&[])).field("seats"),
        Case::json("five seats", good(&[(4, 1), (4, 2), (4, 3), (4, 4), (4, 5)])).field("seats"),
        Case::json("two thousand seats", good(&[FREE; 2000])).field("seats"),
        Case::json("a seat twice", good(&[FREE, FREE2, FREE])).field("seats[2]"),
        Case::json("a blocked seat", good(&[FREE, BLOCKED])).field("seats[1]"),
        Case::json("row 0", good(&[FREE, (0, 1)])).field("seats[1].row"),
        Case::json("row rows+1", good(&[FREE, (ROWS + 1, 1)])).field("seats[1].row"),
        Case::json("row -1", good(&[FREE, (-1, 1)])).field("seats[1].row"),
        Case::json("col 0", good(&[FREE, (1, 0)])).field("seats[1].col"),
        Case::json("col cols+1", good(&[FREE, (1, COLS + 1)])).field("seats[1].col"),
        Case::json("row 32768 (past i16)", good(&[FREE, (32_768, 1)])).field("seats[1].row"),
        // Too big.
        Case::raw("100 KiB body", huge.clone()).expect(413, "payload_too_large"),
        Case::raw("64 KiB + 1 byte", over.clone()).expect(413, "payload_too_large"),
        Case::raw("64 KiB + 1 byte, chunked", over).chunked().expect(413, "payload_too_large"),
        Case::raw("100 KiB body, chunked", huge.clone()).chunked().expect(413, "payload_too_large"),
        Case::raw("100 KiB garbage, chunked", vec![b'x'; HUGE]).chunked().expect(413, "payload_too_large"),
        // Who is asking.
        Case::json("no Authorization", good(&[FREE])).auth(Auth::None).expect(401, "unauthorized"),
        Case::json("Bearer without token", good(&[FREE])).auth(Auth::Raw(hv("Bearer"))).expect(401, "unauthorized"),
        Case::json("Basic credentials", good(&[FREE])).auth(Auth::Raw(hv("Basic dXNlcjpwYXNzd29yZA=="))).expect(401, "unauthorized"),
        Case::json("Token scheme", good(&[FREE])).auth(Auth::Raw(hv(&format!("Token {token}")))).expect(401, "unauthorized"),
        Case::json("no scheme", good(&[FREE])).auth(Auth::Raw(hv(&token))).expect(401, "unauthorized"),
        Case::json("token and trailing junk", good(&[FREE])).bearer(&format!("{token} junk")).expect(401, "unauthorized"),
        Case::json("garbage token", good(&[FREE])).bearer("a.b.c").expect(401, "unauthorized"),
        Case::json("non-ASCII Authorization", good(&[FREE])).auth(Auth::Raw(HeaderValue::from_bytes(b"Bearer \xe2\x82\xac").unwrap())).expect(401, "unauthorized"),
        Case::json("forged token", good(&[FREE])).bearer(&forged).expect(401, "unauthorized"),
        Case::json("tampered payload", good(&[FREE])).bearer(&tampered).expect(401, "unauthorized"),
        Case::json("expired token", good(&[FREE])).bearer(&expired).expect(401, "unauthorized"),
        Case::json("alg none", good(&[FREE])).bearer(&alg_none).expect(401, "unauthorized"),
        Case::json("alg none, signed", good(&[FREE])).bearer(&alg_none_signed).expect(401, "unauthorized"),
        Case::json("HS256 without a signature", good(&[FREE])).bearer(&unsigned).expect(401, "unauthorized"),
        Case::json("hand-made, other secret", good(&[FREE])).bearer(&other_secret).expect(401, "unauthorized"),
        Case::json("HS512 with the right secret", good(&[FREE])).bearer(&hs512).expect(401, "unauthorized"),
        Case::json("sub is not a UUID", good(&[FREE])).bearer(&bad_sub).expect(401, "unauthorized"),
        Case::json("no exp", good(&[FREE])).bearer(&no_exp).expect(401, "unauthorized"),
        Case::json("admin token as user", good(&[FREE])).bearer(ADMIN_TOKEN).expect(401, "unauthorized"),
        // Idempotency-Key.
        Case { name: "key of 256 characters".into(), ..key(hv(&"k".repeat(256))) }.field("Idempotency-Key"),
        Case { name: "key with a tab".into(), ..key(hv("abc\tdef")) }.field("Idempotency-Key"),
        Case { name: "key with a non-ASCII byte".into(), ..key(HeaderValue::from_bytes(b"abc\xe9def").unwrap()) }.field("Idempotency-Key"),
        Case { name: "empty key".into(), ..key(hv("")) }.field("Idempotency-Key"),
    ];

    let before = (r.snapshot(sid).await, row_counts(&db).await);
    run_cases(
        &cases,
        async |case| {
            case.send(&r, Method::POST, "/api/bookings/start", &token)
                .await
        },
        async || format!("{:?}", (r.snapshot(sid).await, row_counts(&db).await)),
    )
    .await;
    db.assert_consistent().await;

    // Control: the refused requests did not fail for a reason shared with
    // good ones. A valid body of exactly the 64 KiB limit is taken.
    let ok = Case::raw("at the limit", padded(&good_text, LIMIT))
        .send(&r, Method::POST, "/api/bookings/start", &token)
        .await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(
        r.snapshot(sid).await.0,
        before.0 .0 + 1,
        "one OCCUPIED event"
    );
    db.assert_consistent().await;
}

#[tokio::test]
async fn bad_schedule_requests_are_refused_and_create_nothing() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let guest = r.guest().await;
    let good = json!({"title": "Show", "startsAt": "2026-12-24T19:30:00Z", "rows": 10, "cols": 20,
                      "blocked": [{"row": 1, "col": 1}]});
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let blocked = |seats: Value| with("blocked", seats);
    let good_text = good.to_string();
    let huge = padded(&good_text, HUGE);

    let cases: Vec<Case> = vec![
        Case::raw("malformed JSON", "{\"title\": \"Show\",").field("body"),
        Case::raw("trailing garbage", format!("{good_text}]")).field("body"),
        Case::raw("empty body", "").field("body"),
        Case::raw("no content type", good_text.clone())
            .content_type(None)
            .field("Content-Type"),
        Case::raw("text/html", good_text.clone())
            .content_type(Some("text/html"))
            .field("Content-Type"),
        Case::json("unknown field", with("venue", json!("Hall"))).field("venue"),
        Case::json("missing title", without("title")).field("title"),
        Case::json("missing startsAt", without("startsAt")).field("startsAt"),
        Case::json("missing rows", without("rows")).field("rows"),
        Case::json("missing cols", without("cols")).field("cols"),
        Case::json("body is an array", json!([good.clone()])).field("body"),
        Case::json("rows 0", with("rows", json!(0))).field("rows"),
        Case::json("rows 101", with("rows", json!(101))).field("rows"),
        Case::json("rows -1", with("rows", json!(-1))).field("rows"),
        Case::json("cols 0", with("cols", json!(0))).field("cols"),
        Case::json("cols 101", with("cols", json!(101))).field("cols"),
        Case::json("rows as string", with("rows", json!("10"))).field("rows"),
        Case::json("rows 10.5", with("rows", json!(10.5))).field("rows"),
        Case::json("rows 1e30", with("rows", json!(1e30))).field("rows"),
        Case::json("rows null", with("rows", Value::Null)).field("rows"),
        Case::json("rows i64::MAX", with("rows", json!(i64::MAX))).field("rows"),
        Case::raw(
            "rows 20 digits",
            good_text.replace("\"rows\":10", "\"rows\":99999999999999999999"),
        )
        .field("rows"),
        Case::json("blocked row 0", blocked(json!([{"row": 0, "col": 1}]))).field("blocked[0].row"),
        Case::json(
            "blocked row past the grid",
            blocked(json!([{"row": 1, "col": 1}, {"row": 11, "col": 1}])),
        )
        .field("blocked[1].row"),
        Case::json(
            "blocked col past the grid",
            blocked(json!([{"row": 1, "col": 21}])),
        )
        .field("blocked[0].col"),
        Case::json(
            "blocked twice",
            blocked(json!([{"row": 1, "col": 1}, {"row": 1, "col": 1}])),
        )
        .field("blocked[1]"),
        Case::json("blocked is an object", blocked(json!({"row": 1, "col": 1}))).field("blocked"),
        Case::json("blocked null", blocked(Value::Null)).field("blocked"),
        Case::json("blocked seat missing col", blocked(json!([{"row": 1}])))
            .field("blocked[0].col"),
        Case::json("startsAt not a time", with("startsAt", json!("tomorrow"))).field("startsAt"),
        Case::json(
            "startsAt without zone",
            with("startsAt", json!("2026-12-24T19:30:00")),
        )
        .field("startsAt"),
        Case::json(
            "startsAt month 13",
            with("startsAt", json!("2026-13-01T00:00:00Z")),
        )
        .field("startsAt"),
        Case::json("startsAt empty", with("startsAt", json!(""))).field("startsAt"),
        Case::json("startsAt a number", with("startsAt", json!(1_790_000_000))).field("startsAt"),
        Case::json("title empty", with("title", json!(""))).field("title"),
        Case::json("title blank", with("title", json!("   \t "))).field("title"),
        Case::json("title too long", with("title", json!("x".repeat(201)))).field("title"),
        Case::json(
            "title with a control character",
            with("title", json!("Show\u{0}")),
        )
        .field("title"),
        Case::json("title a number", with("title", json!(7))).field("title"),
        Case::raw("100 KiB body", huge.clone()).expect(413, "payload_too_large"),
        Case::raw("100 KiB body, chunked", huge.clone())
            .chunked()
            .expect(413, "payload_too_large"),
        Case::json("no credentials", good.clone())
            .auth(Auth::None)
            .expect(401, "unauthorized"),
        Case::json("wrong admin token", good.clone())
            .bearer("not-the-admin-token-0123456789")
            .expect(403, "forbidden"),
        Case::json("a guest token", good.clone())
            .bearer(&guest)
            .expect(403, "forbidden"),
        Case::json("admin token with a suffix", good.clone())
            .bearer(&format!("{ADMIN_TOKEN}x"))
            .expect(403, "forbidden"),
    ];

    run_cases(
        &cases,
        async |case| {
            case.send(&r, Method::POST, "/api/schedules", ADMIN_TOKEN)
                .await
        },
        async || format!("{:?}", row_counts(&db).await),
    )
    .await;
    let list = r.get("/api/schedules", None).await;
    assert_eq!(list.body, json!([]));

    // Control: a good body at every limit is created: the largest grid, a
    // blocked seat in its far corner, the longest title (checked as stored,
    // that is trimmed).
    let title = "x".repeat(200);
    let mut edge = with("rows", json!(100));
    edge["cols"] = json!(100);
    edge["blocked"] = json!([{"row": 100, "col": 100}]);
    edge["title"] = json!(format!("  {title}\n"));
    let ok = r
        .post("/api/schedules", Some(ADMIN_TOKEN), Some(edge))
        .await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(ok.body["title"], title);
    db.assert_consistent().await;
}

#[tokio::test]
async fn bad_path_ids_are_invalid_requests() {
    let (db, r) = TestDb::with_replica(ReplicaOpts::default()).await;
    let sid = r.create_schedule(2, 2, &[]).await;
    let token = r.guest().await;
    let b = r.hold(&token, sid, &[(1, 1)]).await;
    let id = b.booking_id();

    let at = |method: Method, path: String| Case {
        name: format!("{method} {path}"),
        body: Payload::None,
        content_type: None,
        ..Case::raw("", "").field("id")
    };
    let get = |path: &str| at(Method::GET, path.to_owned());
    let post = |path: &str| at(Method::POST, path.to_owned());
    let max = i64::MAX;
    let cases = vec![
        get("/api/schedules/abc"),
        get("/api/schedules/0"),
        get("/api/schedules/-1"),
        get("/api/schedules/1.0"),
        get("/api/schedules/1e3"),
        get("/api/schedules/0x10"),
        get("/api/schedules/%20"),
        get("/api/schedules/%FF"),
        get("/api/schedules/99999999999999999999"),
        get("/api/schedules/9223372036854775808"),
        get(&format!("/api/schedules/{max}")).expect(404, "schedule_not_found"),
        get("/api/schedules/abc/seat-status"),
        get("/api/schedules/0/seat-status"),
        get("/api/schedules/99999999999999999999/seat-status"),
        get(&format!("/api/schedules/{max}/seat-status")).expect(404, "schedule_not_found"),
        get("/api/schedules/abc/seats/stream"),
        get("/api/schedules/0/seats/stream"),
        get(&format!("/api/schedules/{max}/seats/stream")).expect(404, "schedule_not_found"),
        get("/api/bookings/not-a-uuid"),
        get(&format!("/api/bookings/{id}x")),
        get(&format!("/api/bookings/{}", &id[..35])),
        get("/api/bookings/12345"),
        post("/api/bookings/not-a-uuid/confirm"),
        post("/api/bookings/not-a-uuid/cancel"),
        post(&format!("/api/bookings/{}/cancel", Uuid::new_v4())).expect(404, "booking_not_found"),
    ];
    run_cases(
        &cases,
        async |case| {
            let (method, path) = case.name.split_once(' ').unwrap();
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            case.send(&r, method, path, &token).await
        },
        async || format!("{:?}", (r.snapshot(sid).await, row_counts(&db).await)),
    )
    .await;
    // The booking itself is untouched.
    assert_eq!(r.booking(&token, &id).await.body["status"], "PENDING");
    db.assert_consistent().await;
}
