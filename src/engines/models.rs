//! The engines' own model cards: each engine's `GET /v1/models` objects (`owned_by`, `root`,
//! `max_model_len`, …), so that the router's `/v1/models` and `/v1/models/{id}` show what the
//! engines say rather than values the router made up.
//!
//! Cards are fetched when a client asks and the last fetch is older than [`CARDS_MAX_AGE`]
//! (concurrent askers share one fetch); each engine gets [`CARD_FETCH_TIMEOUT`], and an engine
//! that does not answer keeps the cards it gave before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use super::{Engine, Registry};
use crate::upstream::{self, HttpClient};

/// How long fetched cards are served before the next request fetches them again.
pub const CARDS_MAX_AGE: Duration = Duration::from_secs(30);
/// The largest `/v1/models` answer read from an engine.
pub const CARDS_MAX_BYTES: usize = 1024 * 1024;
/// How long one engine's `/v1/models` may take.
pub const CARD_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Model cards by model id, merged over the engines that serve each model.
#[derive(Debug, Default)]
pub struct ModelCards {
    cards: ArcSwap<HashMap<String, serde_json::Value>>,
    /// When the cards were last fetched; held while fetching, so askers share one fetch.
    fetched_at: Mutex<Option<Instant>>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<serde_json::Value>,
}

impl ModelCards {
    pub fn new() -> ModelCards {
        ModelCards::default()
    }

    /// The card of `model` as an engine serving it described it, if one did.
    pub fn get(&self, model: &str) -> Option<serde_json::Value> {
        self.cards.load().get(model).cloned()
    }

    /// Whether `model` is a LoRA adapter as its card says (vLLM's cards of adapters name their
    /// base model in `parent`); `false` while no card of it was fetched.
    pub fn is_adapter(&self, model: &str) -> bool {
        self.cards
            .load()
            .get(model)
            .and_then(|c| c.get("parent")?.as_str().map(|p| p != model))
            .unwrap_or(false)
    }

    /// The context length of `model` as its card gives it (vLLM's `max_model_len`), if a card
    /// of it was fetched.
    pub fn max_model_len(&self, model: &str) -> Option<usize> {
        let n = self
            .cards
            .load()
            .get(model)?
            .get("max_model_len")?
            .as_u64()?;
        usize::try_from(n).ok().filter(|&n| n > 0)
    }

    /// Fetches the cards again if they are older than [`CARDS_MAX_AGE`].
    pub async fn refresh_if_stale(&self, registry: &Registry, client: &HttpClient) {
        let mut fetched_at = self.fetched_at.lock().await;
        if fetched_at.is_some_and(|t| t.elapsed() < CARDS_MAX_AGE) {
            return;
        }
        self.refresh(registry, client).await;
        *fetched_at = Some(Instant::now());
    }

    async fn refresh(&self, registry: &Registry, client: &HttpClient) {
        let engines = registry.all();
        let mut fetches = JoinSet::new();
        for (order, engine) in engines.iter().enumerate().filter(|(_, e)| e.is_healthy()) {
            let (engine, client) = (Arc::clone(engine), client.clone());
            fetches.spawn(async move {
                let url = format!("{}/v1/models", engine.url);
                let got = upstream::get(&client, &url, CARD_FETCH_TIMEOUT, CARDS_MAX_BYTES).await;
                (order, engine, got)
            });
        }
        let mut answers = Vec::new();
        while let Some(Ok((order, engine, got))) = fetches.join_next().await {
            match got.map(|body| serde_json::from_slice::<ModelList>(&body)) {
                Ok(Ok(list)) => answers.push((order, engine, list.data)),
                Ok(Err(e)) => {
                    tracing::debug!(engine = %engine.name, error = %e, "engine /v1/models is not a model list")
                }
                Err(e) => {
                    tracing::debug!(engine = %engine.name, error = %e, "engine /v1/models failed")
                }
            }
        }
        // Registry order decides which engine's card of a model is shown; models nobody
        // described this time keep their previous card.
        answers.sort_by_key(|a| a.0);
        let mut cards = HashMap::new();
        for (_, engine, data) in answers {
            merge(&mut cards, &engine, data);
        }
        for (id, card) in self.cards.load().iter() {
            cards.entry(id.clone()).or_insert_with(|| card.clone());
        }
        self.cards.store(Arc::new(cards));
    }
}

/// Takes the cards of the models `engine` is configured to serve that no earlier engine
/// described (cards of other models are ignored).
fn merge(
    cards: &mut HashMap<String, serde_json::Value>,
    engine: &Engine,
    data: Vec<serde_json::Value>,
) {
    for card in data {
        let Some(id) = card.get("id").and_then(|v| v.as_str()) else {
            continue;
        };
        if engine.serves(id) && !cards.contains_key(id) {
            cards.insert(id.to_owned(), card);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_models_cards_are_kept() {
        let e = Engine::new(0, "http://a:1", vec!["m".into()]);
        let mut cards = HashMap::new();
        merge(
            &mut cards,
            &e,
            vec![
                serde_json::json!({"id": "m", "owned_by": "vllm", "max_model_len": 4096}),
                serde_json::json!({"id": "other", "owned_by": "x"}),
                serde_json::json!({"no_id": true}),
            ],
        );
        assert_eq!(cards.len(), 1);
        assert_eq!(cards["m"]["owned_by"], "vllm");
        let store = ModelCards::new();
        assert!(!store.is_adapter("m"));
        cards.insert(
            "sql".into(),
            serde_json::json!({"id": "sql", "parent": "m"}),
        );
        store.cards.store(Arc::new(cards));
        assert!(store.is_adapter("sql") && !store.is_adapter("m"));
        assert_eq!(store.max_model_len("m"), Some(4096));
        assert_eq!(store.max_model_len("sql"), None);
    }
}
