//! The console's static files, compiled into the binary: its stylesheet and chart script, and
//! the vendored uPlot chart library (MIT, `server/assets/console/vendor/uplot/`). Nothing is
//! loaded from anywhere else.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Every asset: name under `/console/assets/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("console.css", "text/css; charset=utf-8", include_bytes!("../../assets/console/console.css")),
    ("console.js", "text/javascript; charset=utf-8", include_bytes!("../../assets/console/console.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../../assets/console/vendor/uplot/uPlot.min.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_bytes!("../../assets/console/vendor/uplot/uPlot.iife.min.js")),
    ("uPlot.LICENSE.txt", "text/plain; charset=utf-8", include_bytes!("../../assets/console/vendor/uplot/LICENSE")),
];

/// `GET /console/assets/{name}`: one asset, or 404.
pub async fn serve(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, bytes)) => ([(header::CONTENT_TYPE, *content_type)], *bytes).into_response(),
        None => super::ConsoleError::Api(crate::ApiError::not_found("asset")).into_response(),
    }
}
