//! Keeping secrets out of logs and printed config.

/// `amqp://user:secret@host/vhost` → `amqp://user:***@host/vhost`. Text
/// without a password is returned unchanged.
#[must_use]
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..authority_start],
        &userinfo[..colon],
        &url[authority_start + at..]
    )
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn masks_only_the_password() {
        assert_eq!(
            mask_url("amqp://guest:s3cr%40t@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_url("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_url("amqp://user@host/"), "amqp://user@host/");
        assert_eq!(
            mask_url("amqps://u:p@h/v?heartbeat=10"),
            "amqps://u:***@h/v?heartbeat=10"
        );
        assert_eq!(mask_url("not a url"), "not a url");
    }
}
