// Follows a running run's log on its page: the server-sent events of /runs/{id}/events,
// starting after the last line the page was rendered with. The browser reconnects by itself
// after a dropped connection, sending the last line's number as Last-Event-ID, so nothing is
// shown twice or lost. When the run ends the page reloads to show its results.
(function () {
  "use strict";
  var pre = document.getElementById("log-lines");
  if (!pre || pre.getAttribute("data-live") !== "yes" || !window.EventSource) {
    return;
  }
  var run = pre.getAttribute("data-run");
  var progress = document.getElementById("progress");
  var status = document.getElementById("status");
  var source = new EventSource("/runs/" + run + "/events?after=" + pre.getAttribute("data-after"));
  source.addEventListener("log", function (event) {
    var following = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
    // A blank line comes as an event without data, which browsers do not deliver; its number
    // is still counted, so a gap before this line's number is that many blank lines.
    var blank = "";
    var gap = Number(event.lastEventId) - Number(pre.getAttribute("data-after")) - 1;
    for (var i = 0; i < gap && i < 100000; i++) {
      blank += "\n";
    }
    pre.appendChild(document.createTextNode(blank + event.data + "\n"));
    pre.setAttribute("data-after", event.lastEventId);
    if (following) {
      pre.scrollTop = pre.scrollHeight;
    }
  });
  source.addEventListener("progress", function (event) {
    var done = JSON.parse(event.data);
    if (progress && done.total > 0) {
      progress.textContent = done.done + "/" + done.total + " nodes done";
    }
  });
  source.addEventListener("end", function (event) {
    source.close();
    var end = JSON.parse(event.data);
    if (status) {
      status.textContent = end.status;
      status.className = "status s-" + end.status;
    }
    window.setTimeout(function () { window.location.reload(); }, 1000);
  });
})();
