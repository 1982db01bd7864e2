// Tally console: draws the usage charts of a user's page with uPlot (vendored, served from
// /console/assets). The data is the JSON in #usage-charts[data-usage], rendered by the server;
// this file is the page's only script (the Content-Security-Policy allows no inline code).
(function () {
  "use strict";

  function dayToSeconds(day) {
    var p = day.split("-");
    return Date.UTC(+p[0], +p[1] - 1, +p[2]) / 1000;
  }

  function draw(figure, days, s) {
    var x = days.map(dayToSeconds);
    var data = [x, s.daily, s.used];
    var series = [
      {},
      { label: "per day", stroke: "#2f6fdf", fill: "rgba(47,111,223,0.25)", paths: uPlot.paths.bars({ size: [0.7, 40] }), points: { show: false } },
      { label: s.period ? "used this " + s.period : "used", stroke: "#1c8a55", width: 2 },
    ];
    if (s.limit !== null) {
      data.push(x.map(function () { return s.limit; }));
      series.push({ label: "limit", stroke: "#c0392b", width: 2, dash: [6, 4], points: { show: false } });
    }
    var width = Math.max(320, Math.min(figure.clientWidth || 900, 1100));
    var opts = {
      width: width,
      height: 220,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
      series: series,
      // Half a day on each side, so the first and last bars are whole.
      scales: { x: { time: true, range: function (u, min, max) { return [min - 43200, max + 43200]; } }, y: { range: function (u, min, max) { return [0, Math.max(1, max) * 1.1]; } } },
      axes: [{}, { label: s.unit === "micros" ? "AI cost (micros)" : "units" }],
      legend: { live: false },
    };
    var chart = new uPlot(opts, data, figure);
    // What the chart holds, for people reading the DOM and for the browser tests.
    figure.dataset.rendered = "true";
    figure.dataset.series = JSON.stringify({
      days: chart.data[0].length,
      daily: chart.data[1],
      used: chart.data[2],
      limit: chart.data.length > 3 ? chart.data[3][0] : null,
    });
    return chart;
  }

  function init() {
    var box = document.getElementById("usage-charts");
    if (!box || typeof uPlot === "undefined") return;
    var chart = JSON.parse(box.dataset.usage);
    var drawn = 0;
    chart.features.forEach(function (s) {
      var figure = document.getElementById("chart-" + s.feature);
      if (figure) {
        draw(figure, chart.days, s);
        drawn += 1;
      }
    });
    box.dataset.drawn = String(drawn);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
