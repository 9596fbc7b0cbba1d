//! The seat-map page, served by the same binary (no build step, no CDN).

use axum::response::Html;
use axum::routing::get;
use axum::Router;

use super::AppState;

const PAGE: &str = include_str!("seat_map.html");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/schedules/{id}", get(page))
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}
