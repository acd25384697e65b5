//! `GET /` and `GET /assets/{file}`: the dashboard page. Its sources are in `web/`;
//! `web/build.sh` bundles them into `web/dist`, which is committed and compiled into
//! the binary here, so that a server needs no files beside it and building it needs no
//! Node. The page loads nothing from elsewhere and calls only the documented API, with
//! the key the user pastes (see `docs/api.md`).
//!
//! Caching: the page itself is revalidated on every load (`no-cache` with an ETag), and
//! names its script and stylesheet with a hash of their content (`?v=`), so that those
//! can be cached for good: a new build changes the page, which names new URLs.

use std::sync::LazyLock;

use axum::extract::{Path, RawQuery};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::http::error::{ApiError, ErrorBody};

/// Only this origin, for everything: no inline script or style, no frames, and no form
/// submission (the sign-in form is handled by the script; should the script not run,
/// the key must not be posted anywhere).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// For fingerprinted URLs: a year, the longest that caches honour.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Revalidate on every use (a 304 when unchanged).
const REVALIDATE: &str = "no-cache";

/// One embedded file.
struct Asset {
    body: Bytes,
    content_type: &'static str,
    /// A strong ETag (quoted), also the `v` of its fingerprinted URL (unquoted).
    etag: String,
}

impl Asset {
    fn new(body: Bytes, content_type: &'static str) -> Self {
        let digest = Sha256::digest(&body);
        Self {
            etag: format!("\"{}\"", hex::encode(&digest[..8])),
            body,
            content_type,
        }
    }

    fn version(&self) -> &str {
        self.etag.trim_matches('"')
    }

    /// `/assets/{name}?v=<hash>`: changes whenever the content does.
    fn url(&self, name: &str) -> String {
        format!("/assets/{name}?v={}", self.version())
    }
}

static APP_JS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        Bytes::from_static(include_bytes!("../../web/dist/app.js")),
        "text/javascript; charset=utf-8",
    )
});

static APP_CSS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        Bytes::from_static(include_bytes!("../../web/dist/app.css")),
        "text/css; charset=utf-8",
    )
});

static ICON: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        Bytes::from_static(include_bytes!("../../web/dist/icon.svg")),
        "image/svg+xml",
    )
});

/// The page, with the fingerprinted URLs filled in. They are computed from the very
/// bytes embedded above, so the page can never name a script it does not get.
static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    let html = include_str!("../../web/dist/index.html")
        .replace("{{app.js}}", &APP_JS.url("app.js"))
        .replace("{{app.css}}", &APP_CSS.url("app.css"));
    Asset::new(Bytes::from(html), "text/html; charset=utf-8")
});

fn by_name(name: &str) -> Option<&'static Asset> {
    match name {
        "app.js" => Some(&APP_JS),
        "app.css" => Some(&APP_CSS),
        "icon.svg" => Some(&ICON),
        _ => None,
    }
}

#[utoipa::path(
    get,
    path = "/",
    operation_id = "dashboard",
    tag = "dashboard",
    params(("If-None-Match" = Option<String>, Header, description = "A previous answer's ETag")),
    responses(
        (status = 200, description = "The dashboard page", body = String, content_type = "text/html; charset=utf-8",
            headers(("ETag" = String), ("Cache-Control" = String), ("Content-Security-Policy" = String))),
        (status = 304, description = "Unchanged since the ETag sent", headers(("ETag" = String))),
    )
)]
pub(super) async fn index(headers: HeaderMap) -> Response {
    respond(&INDEX, REVALIDATE, &headers)
}

#[utoipa::path(
    get,
    path = "/assets/{file}",
    operation_id = "dashboardAsset",
    tag = "dashboard",
    params(
        ("file" = String, Path, pattern = "^(app\\.js|app\\.css|icon\\.svg)$",
            description = "`app.js`, `app.css` or `icon.svg`; any other name is a 404"),
        ("v" = Option<String>, Query,
            description = "The content hash the page names: under the current one the answer may be cached for good"),
        ("If-None-Match" = Option<String>, Header, description = "A previous answer's ETag"),
    ),
    responses(
        (status = 200, description = "The script, stylesheet or icon",
            content(
                (String = "text/javascript; charset=utf-8"),
                (String = "text/css; charset=utf-8"),
                (String = "image/svg+xml"),
            ),
            headers(("ETag" = String), ("Cache-Control" = String), ("Content-Security-Policy" = String))),
        (status = 304, description = "Unchanged since the ETag sent", headers(("ETag" = String))),
        (status = 404, description = "No such asset", body = ErrorBody),
    )
)]
pub(super) async fn asset(
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let asset = by_name(&file).ok_or(ApiError::NotFound)?;
    // Cached for good only under the URL of this very content: an old page asking for
    // `?v=<old>` after an upgrade gets the new bytes, and must not keep them as the old.
    let current = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == format!("v={}", asset.version())));
    let cache = if current { IMMUTABLE } else { REVALIDATE };
    Ok(respond(asset, cache, &headers))
}

fn respond(asset: &Asset, cache: &'static str, request: &HeaderMap) -> Response {
    let unchanged = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == asset.etag
        });
    let etag = HeaderValue::from_str(&asset.etag).expect("a hex ETag is a valid header");
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ];
    if unchanged {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body.clone(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    // The two routes as `api::routes()` declares them, without the state the rest of
    // the API needs.
    fn routes() -> Router {
        Router::new()
            .route("/", routing::get(index))
            .route("/assets/{file}", routing::get(asset))
    }

    async fn get(uri: &str, if_none_match: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = Request::get(uri);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        let resp = routes()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        (
            parts.status,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        )
    }

    #[tokio::test]
    async fn the_page_names_its_assets_by_content_and_they_are_served_with_their_types() {
        let (status, headers, body) = get("/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(headers[header::CACHE_CONTROL], REVALIDATE);
        assert!(headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .starts_with("default-src 'self'"));
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(!html.contains("{{"), "every placeholder is filled");
        for (name, kind) in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("app.css", "text/css; charset=utf-8"),
        ] {
            let url = by_name(name).unwrap().url(name);
            assert!(html.contains(&url), "{url} in the page");
            let (status, headers, body) = get(&url, None).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[header::CONTENT_TYPE], kind);
            assert_eq!(headers[header::CACHE_CONTROL], IMMUTABLE);
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(!body.is_empty());
        }
        let (_, headers, _) = get("/assets/icon.svg", None).await;
        assert_eq!(headers[header::CONTENT_TYPE], "image/svg+xml");
    }

    #[tokio::test]
    async fn nothing_is_loaded_from_another_origin() {
        let html = String::from_utf8(INDEX.body.to_vec()).unwrap();
        for attr in ["src=\"", "href=\""] {
            for (i, _) in html.match_indices(attr) {
                let target = &html[i + attr.len()..];
                assert!(
                    target.starts_with('/') || target.starts_with('#'),
                    "{attr}{} is not on this origin",
                    &target[..target.find('"').unwrap_or(target.len())]
                );
            }
        }
    }

    #[tokio::test]
    async fn a_stale_fingerprint_is_not_cached_for_good_and_an_unchanged_asset_gets_304() {
        let (_, headers, _) = get("/assets/app.js?v=0123456789abcdef", None).await;
        assert_eq!(headers[header::CACHE_CONTROL], REVALIDATE);
        let etag = headers[header::ETAG].to_str().unwrap().to_owned();
        let (status, headers, body) = get("/assets/app.js", Some(&etag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert_eq!(headers[header::ETAG], etag.as_str());
        assert!(body.is_empty());
        let (status, _, _) = get("/", Some("\"stale\", W/\"other\"")).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = get("/assets/other.js", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}
