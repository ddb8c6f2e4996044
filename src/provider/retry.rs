//! When to try a call again and how long to wait first: which answers are transient, what
//! the server asked for (`retry-after-ms`, `Retry-After` in seconds or as an HTTP-date), and
//! exponential backoff with jitter otherwise.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// The longest wait a server's `Retry-After` is followed for; longer asks wait this long.
const MAX_ASKED: Duration = Duration::from_secs(600);
/// The longest wait backoff alone grows to, before jitter.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Answers another attempt may fix: timeouts, conflicts, rate limits, server errors.
pub fn is_transient(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || status >= 500
}

/// Answers that say the server has more work than it can take: send less at once.
/// 503 is how Ollama and vLLM say their queue is full; 529 is Anthropic's "overloaded".
pub fn is_overload(status: u16) -> bool {
    matches!(status, 429 | 503 | 529)
}

/// The wait a server asked for: `retry-after-ms` (OpenAI, Azure), else `Retry-After` as
/// seconds or as an HTTP-date (counted from `now`).
pub fn asked_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let millis = header("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms.min(MAX_ASKED.as_secs_f64() * 1000.0) / 1000.0));
    let asked = millis.or_else(|| {
        let value = header("retry-after")?;
        match value.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs >= 0.0 => {
                Some(Duration::from_secs_f64(secs.min(MAX_ASKED.as_secs_f64())))
            }
            Ok(_) => None,
            Err(_) => {
                let date = httpdate::parse_http_date(value).ok()?;
                Some(date.duration_since(now).unwrap_or(Duration::ZERO))
            }
        }
    })?;
    Some(asked.min(MAX_ASKED))
}

/// How long to wait before attempt `attempt + 1` (`attempt` ≥ 1 has just failed).
/// `unit` is a random number in [0, 1) for the jitter.
///
/// Without an ask: `base`, doubling per attempt, capped at 30 s, plus up to 50% jitter so
/// calls that failed together do not return together. With one: what the server asked, plus
/// up to 10% (nothing for `Retry-After: 0`).
pub fn delay(attempt: u32, base: Duration, asked: Option<Duration>, unit: f64) -> Duration {
    let unit = unit.clamp(0.0, 1.0);
    match asked {
        Some(asked) => asked + asked.mul_f64(0.1 * unit),
        None => {
            let doublings = attempt.saturating_sub(1).min(20);
            let wait = base.saturating_mul(1 << doublings).min(MAX_BACKOFF);
            wait + wait.mul_f64(0.5 * unit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn transient_and_overload_statuses() {
        for status in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert!(is_transient(status), "{status}");
        }
        for status in [400, 401, 403, 404, 422] {
            assert!(!is_transient(status), "{status}");
        }
        assert!(is_overload(429) && is_overload(503) && is_overload(529));
        assert!(!is_overload(500) && !is_overload(408));
    }

    #[test]
    fn reads_retry_after_in_seconds_dates_and_milliseconds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            asked_wait(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            asked_wait(&headers(&[("retry-after", "0.5")]), now),
            Some(Duration::from_millis(500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            asked_wait(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            asked_wait(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        // The more precise header wins.
        assert_eq!(
            asked_wait(
                &headers(&[("retry-after", "2"), ("retry-after-ms", "1500")]),
                now
            ),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            asked_wait(&headers(&[("retry-after", "86400")]), now),
            Some(MAX_ASKED)
        );
        assert_eq!(asked_wait(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(asked_wait(&headers(&[("retry-after", "-3")]), now), None);
        assert_eq!(asked_wait(&HeaderMap::new(), now), None);
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_follows_the_server() {
        let base = Duration::from_millis(500);
        assert_eq!(delay(1, base, None, 0.0), Duration::from_millis(500));
        assert!(delay(1, base, None, 0.999_999) < Duration::from_millis(750));
        assert_eq!(delay(2, base, None, 0.0), Duration::from_secs(1));
        assert_eq!(delay(3, base, None, 0.0), Duration::from_secs(2));
        assert_eq!(delay(30, base, None, 0.0), Duration::from_secs(30));
        assert_eq!(delay(u32::MAX, base, None, 1.0), Duration::from_secs(45));
        assert_eq!(
            delay(1, base, Some(Duration::from_secs(9)), 0.0),
            Duration::from_secs(9)
        );
        assert_eq!(
            delay(3, base, Some(Duration::from_secs(10)), 1.0),
            Duration::from_secs(11)
        );
        assert_eq!(delay(1, base, Some(Duration::ZERO), 0.7), Duration::ZERO);
        assert_eq!(
            delay(1, Duration::from_millis(10), None, 0.0),
            Duration::from_millis(10)
        );
    }
}
