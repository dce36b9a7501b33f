//! Per-tenant rate limits through the real router: OpenAI's headers on allowed answers, a 429
//! `rate_limit_exceeded` with `Retry-After` past a limit, tenants apart, and a config-file edit
//! taking effect without a restart.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use switchyard::policy::SettingsLoader;

fn req(url: &str, tenant: &str, max_tokens: u64) -> Request<Full<Bytes>> {
    let body = serde_json::json!({"model": MODEL, "prompt": "hello", "max_tokens": max_tokens});
    Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .header("x-tenant", tenant)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

fn config_text(requests_per_minute: u64) -> String {
    format!(
        "tenant_header = \"x-tenant\"\n\n[[rate_limit]]\ntenant = \"*\"\nrequests_per_minute = {requests_per_minute}\n\n[[rate_limit]]\ntenant = \"big\"\ntokens_per_minute = 1000\n"
    )
}

fn loader(conf: &Path) -> SettingsLoader {
    let conf = conf.to_path_buf();
    let dir = shipped_policies();
    Arc::new(move || {
        let file = switchyard::config::load_file(&conf).map_err(|e| e.to_string())?;
        let mut s = switchyard::config::policy_settings(&Default::default(), &file)
            .map_err(|e| e.to_string())?;
        s.dir = dir.clone();
        Ok(s)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_limited_apart_with_openais_headers_and_limits_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("switchyard.toml");
    std::fs::write(&conf, config_text(2)).expect("write config");
    let sims = start_sims(1, instant_sim()).await;
    let file = switchyard::config::load_file(&conf).expect("config");
    let mut cfg = switchyard::config::RouterConfig::for_backends(&urls(&sims), MODEL);
    cfg.policy.dir = shipped_policies();
    cfg.rate_limits = switchyard::config::rate_limit_rules(&file).expect("rules");
    cfg.tenant_header = Some("x-tenant".into());
    cfg.config_file = Some(conf.clone());
    let router = switchyard::proxy::start(cfg, Some(loader(&conf)))
        .await
        .expect("router starts");
    let (c, url) = (client(), router.url());

    // Tenant a: two requests per minute.
    for remaining in ["1", "0"] {
        let r = send(&c, req(&url, "a", 5)).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining));
        assert!(r.header("x-ratelimit-reset-requests").is_some());
        assert_eq!(
            r.header("x-ratelimit-limit-tokens"),
            None,
            "no token limit for a"
        );
    }
    let r = send(&c, req(&url, "a", 5)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let e = r.json();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("secs");
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    // Tenant b has its own two.
    assert_eq!(send(&c, req(&url, "b", 5)).await.status, StatusCode::OK);
    // Tenant big: tokens (prompt estimate + max_tokens) against 1000 per minute.
    let r = send(&c, req(&url, "big", 600)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    let r = send(&c, req(&url, "big", 600)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json()["error"]["type"], "tokens");
    // Only the engine saw the allowed ones.
    assert_eq!(sims[0].counters().received, 4);

    // Raise the limit in the config file: tenant a goes on without a restart.
    std::fs::write(&conf, config_text(100)).expect("write config");
    let deadline = Instant::now() + SAFETY;
    loop {
        let r = send(&c, req(&url, "a", 5)).await;
        if r.status == StatusCode::OK {
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("100"));
            break;
        }
        assert!(Instant::now() < deadline, "the new limit never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router.shutdown(Duration::from_secs(1)).await;
}
