<?php
// Calls an HTTPS API through tether, as a PHP app does: one call, on a
// connection of its own, in plain HTTP to tether, which carries it over a
// pooled connection with verified TLS.
//
// With tether as the HTTP proxy (config/http-proxy-https.toml), from the
// environment or from --proxy; the URL says http://, tether speaks TLS:
//
//   http_proxy=http://127.0.0.1:3128 php call_api.php http://api.example.com/v1/status
//   php call_api.php --proxy http://127.0.0.1:3128 http://api.example.com/v1/status
//
// With a local port per API (config/https-api.toml), naming the API in Host:
//
//   php call_api.php --host api.example.com http://127.0.0.1:8081/v1/status
//
// The curl extension by default; --streams uses file_get_contents with a
// stream context instead. Prints the status, then the body. Exits 1 when the
// answer is an error; when tether made the answer itself, its reason
// (x-tether-error) goes to stderr.

// libcurl reads http_proxy from the environment itself; PHP's http stream
// wrapper does not. Under php-fpm the environment is cleared (clear_env =
// yes): set env[http_proxy] in the pool's configuration, or pass the proxy.
function proxy_from(array $options): ?string
{
    if (isset($options['proxy'])) {
        return $options['proxy'];
    }
    $env = getenv('http_proxy');
    return $env === false || $env === '' ? null : $env;
}

// The curl extension: returns [status, headers (lower-case names), body].
function call_with_curl(string $url, ?string $proxy, ?string $host): array
{
    $headers = [];
    $ch = curl_init($url);
    $options = [
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 10,
        CURLOPT_HEADERFUNCTION => function ($ch, string $line) use (&$headers): int {
            $parts = explode(':', $line, 2);
            if (count($parts) === 2) {
                $headers[strtolower(trim($parts[0]))] = trim($parts[1]);
            }
            return strlen($line);
        },
    ];
    if ($proxy !== null) {
        $options[CURLOPT_PROXY] = $proxy;
    }
    if ($host !== null) {
        $options[CURLOPT_HTTPHEADER] = ["Host: $host"];
    }
    curl_setopt_array($ch, $options);
    $body = curl_exec($ch);
    if ($body === false) {
        fwrite(STDERR, 'curl: ' . curl_error($ch) . "\n");
        exit(1);
    }
    return [curl_getinfo($ch, CURLINFO_RESPONSE_CODE), $headers, $body];
}

// file_get_contents with a stream context: the proxy as tcp://, the full URI
// on the request line (absolute form, as proxies expect).
function call_with_streams(string $url, ?string $proxy, ?string $host): array
{
    $http = ['timeout' => 10, 'ignore_errors' => true];
    if ($proxy !== null) {
        $http['proxy'] = preg_replace('#^http://#', 'tcp://', $proxy);
        $http['request_fulluri'] = true;
    }
    if ($host !== null) {
        $http['header'] = "Host: $host";
    }
    $body = file_get_contents($url, false, stream_context_create(['http' => $http]));
    if ($body === false) {
        exit(1);
    }
    $status = (int) explode(' ', $http_response_header[0])[1];
    $headers = [];
    foreach (array_slice($http_response_header, 1) as $line) {
        $parts = explode(':', $line, 2);
        if (count($parts) === 2) {
            $headers[strtolower(trim($parts[0]))] = trim($parts[1]);
        }
    }
    return [$status, $headers, $body];
}

$options = getopt('', ['proxy:', 'host:', 'streams'], $rest);
$url = $argv[$rest] ?? null;
if ($url === null) {
    fwrite(STDERR, "usage: php call_api.php [--proxy URL] [--host NAME] [--streams] http://HOST/PATH\n");
    exit(64);
}
if (str_starts_with($url, 'https://')) {
    // Through a proxy, https:// becomes a CONNECT tunnel (tether answers 405:
    // a tunnel cannot be pooled); without one it bypasses tether.
    fwrite(STDERR, 'call http://' . substr($url, 8) . ": tether originates the TLS\n");
    exit(1);
}
$call = isset($options['streams']) ? 'call_with_streams' : 'call_with_curl';
[$status, $headers, $body] = $call($url, proxy_from($options), $options['host'] ?? null);

echo $status, "\n", $body, "\n";
if (isset($headers['x-tether-error'])) {
    fwrite(STDERR, 'tether: ' . $headers['x-tether-error'] . "\n");
}
exit($status >= 200 && $status < 400 ? 0 : 1);
